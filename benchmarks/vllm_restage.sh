#!/usr/bin/env bash
# Re-splits ../shared/bench/vllm_bundle.sh's .peer/{a,b,c,d} into parts that each travel beside a working tree of
# ~24 MB (a device call carries 64 MiB in all): .peer/s1..s4 (~31 MB of vLLM's tar.zst each, with zstd and the
# wheels spread over them) and .peer/d (the last wheels: the serving call carries it with .peer/e and .devcarry/serve;
# serve_gpu.sh copies it into /tmp/peer and unpacks). Staging, one call each on one warm machine (~30 s idle
# release: call back to back): `mkdir -p /tmp/peer && cp .peer/sN/* /tmp/peer/` carrying .peer/sN.
# Run benchmarks/serve_gpu_prepare.sh after vllm_bundle.sh (the bundle removes .peer/e), then this.
set -euo pipefail
peer=$PWD/.peer; work=$(mktemp -d)
cat "$peer"/a/vpart.00 "$peer"/b/vpart.01 "$peer"/c/vpart.02 > "$work/vllm.tar.zst"
size=$(stat -c %s "$work/vllm.tar.zst")
(cd "$work" && split -b $(( size / 4 + 1 )) -d vllm.tar.zst vpart.)
rm -rf "$peer"/s1 "$peer"/s2 "$peer"/s3 "$peer"/s4; mkdir -p "$peer"/s{1,2,3,4}
for i in 0 1 2 3; do mv "$work/vpart.0$i" "$peer/s$((i + 1))/"; done
mv "$peer"/a/zstd "$peer"/b/*.whl "$peer"/s1/
mv "$peer"/c/*.whl "$peer"/s2/
mv "$peer"/d/pycountry-*.whl "$peer"/s3/
mv "$peer"/d/mistral_common-*.whl "$peer"/s4/
rm -rf "$peer"/a "$peer"/b "$peer"/c "$peer"/d/vpart.* "$work"
du -sh "$peer"/*
