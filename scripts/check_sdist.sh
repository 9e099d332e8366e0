#!/usr/bin/env bash
# Install zt-gguf from an sdist (pip's default build isolation) into the active environment and check that
# it works: the sdist carries the patches, scripts and C++ sources; the module, the tools and a calibration
# of a tiny generated model run.
#   python -m build --sdist && bash scripts/check_sdist.sh dist/zt_gguf-0.1.0.tar.gz
set -euo pipefail
sdist=${1:?usage: check_sdist.sh SDIST}
PY=${PYTHON:-python}

listing=$(tar -tzf "$sdist")
for f in CMakeLists.txt scripts/fetch_llama_cpp.py cpp/engine.cpp cpp/bindings.cpp cpp/patches/README.md \
         python/zt_gguf/cli.py python/zt_gguf/data/sst2_demo.jsonl; do
    grep -q "^[^/]*/$f\$" <<<"$listing" || { echo "check_sdist: $sdist lacks $f" >&2; exit 1; }
done
n_patches=$(grep -c '^[^/]*/cpp/patches/.*\.patch$' <<<"$listing" || true)
n_repo=$(ls "$(dirname "$0")"/../cpp/patches/*.patch | wc -l)
[ "$n_patches" = "$n_repo" ] || { echo "check_sdist: $n_patches patches in the sdist, $n_repo in cpp/patches" >&2; exit 1; }
grep -q '^[^/]*/third_party/' <<<"$listing" && { echo "check_sdist: the sdist carries third_party/" >&2; exit 1; }

t0=$(date +%s)
"$PY" -m pip install -q "$sdist"
echo "check_sdist: installed from $(basename "$sdist") in $(( $(date +%s) - t0 )) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"   # not the source tree: the installed package must work on its own
"$PY" - <<'EOF'
from zt_gguf import _core  # noqa: F401  the compiled module loads with its bundled libllama
from zt_gguf.testing import make_tiny_llama, write_tiny_task
make_tiny_llama("tiny.gguf", n_layer=2, seed=3)
write_tiny_task("task.jsonl", 30, seed=4, balanced=True)
EOF
for t in llama-cli llama-completion llama-server llama-perplexity llama-bench; do
    test -x "$(zt-gguf tools --path)/$t" || { echo "check_sdist: $t is not installed" >&2; exit 1; }
done
zt-gguf calibrate tiny.gguf --task task.jsonl --threads 1 --force --quiet -o tuned.gguf --json > out.json
"$PY" -c "import json; r = json.load(open('out.json')); assert r['tuned']['n'] > 0, r; print('check_sdist: calibrate ran, scoring', r['scoring']['primary'])"
m=tuned.gguf; [ -f $m ] || m=tiny.gguf  # the search may keep the baseline on a random model
zt-gguf tools llama-completion -m $m -p "the cat" -n 4 --temp 0 -no-cnv -t 1 > /dev/null 2>&1 \
    || { echo "check_sdist: llama-completion failed on $m" >&2; exit 1; }
echo "check_sdist: ok"
