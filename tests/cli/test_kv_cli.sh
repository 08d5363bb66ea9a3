#!/usr/bin/env bash
# `hysparse kv` through the real binary: the paper's numbers, outputs, exit codes.
set -u
HYSPARSE=$1
WORK=$2
rm -rf "$WORK" && mkdir -p "$WORK"
source "$(dirname "$0")/lib.sh"

KV=("$HYSPARSE" kv)
expect kv-help 0 'Usage: .*kv' -- "${KV[@]}" --help
expect kv-list-presets 0 'gemma-3-27b' -- "${KV[@]}" --list-presets
expect kv-list-methods 0 'quest.*Quest' -- "${KV[@]}" --list-methods
# The paper's numbers (HySparse 80B-A3B, BF16).
expect kv-80b-full 0 '100,352 B per token with every layer full' -- "${KV[@]}" --preset hysparse-80b-a3b --context 16K
expect kv-80b-16k 0 '^hysparse +16K .* 10,944 +10,240 +9\.17x' -- "${KV[@]}" --preset hysparse-80b-a3b --context 16K
expect kv-80b-32k 0 '^hysparse +32K .* 9\.47x' -- "${KV[@]}" --preset hysparse-80b-a3b --context 32K
expect kv-80b-128k 0 '^hysparse +128K .* 9\.72x' -- "${KV[@]}" --preset hysparse-80b-a3b --context 128K
expect kv-7b 0 '^hysparse +16K .* 40,960 +3\.53x' -- "${KV[@]}" --preset hysparse-7b --context 16K
expect kv-mla 0 '70,272 B per token with every layer full' -- "${KV[@]}" --preset deepseek-v3 --context 4K
expect kv-proxies 0 '^quest ' -- "${KV[@]}" --preset llama-3.1-8b --context 4K,1M --method full,quest:page=32,h2o,snapkv,duo
expect kv-all 0 '^magicpig ' -- "${KV[@]}" --preset hysparse-80b-a3b --context 32K --method all --batch 4 --dtype fp8
expect kv-json 0 '"marginal_bytes_per_token": 10240' -- "${KV[@]}" --preset hysparse-80b-a3b --context 16K --json
expect kv-report 0 'wrote' -- "${KV[@]}" --preset hysparse-80b-a3b --context 16K,1M -o "$WORK/kv.h5"
[[ -s "$WORK/kv.h5" ]] || { echo "FAIL kv-report wrote no file"; failures=$((failures + 1)); }
if command -v h5dump >/dev/null; then
  expect kv-report-format 0 'hysparse-kv-report' -- h5dump -a /format "$WORK/kv.h5"
fi
cat > "$WORK/config.json" <<'EOF'
{"_name_or_path": "test/gpt-oss-like", "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
 "head_dim": 64, "sliding_window": 128,
 "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}
EOF
expect kv-config 0 '^native ' -- "${KV[@]}" --config "$WORK/config.json" --context 4K --schedule 1:1 --method full,native,hysparse
expect kv-config-report 0 'wrote' -- "${KV[@]}" --config "$WORK/config.json" --context 4K -o "$WORK/config.h5"

# Errors: usage 2, bad input 3, unwritable output 4.
expect kv-no-model 2 'exactly one of --preset' -- "${KV[@]}"
expect kv-bad-preset 2 "unknown preset 'nope'" -- "${KV[@]}" --preset nope
expect kv-bad-method 2 "unknown method 'bogus'" -- "${KV[@]}" --preset llama-3.1-8b --method bogus
expect kv-no-schedule 2 'needs a full/sparse layer schedule' -- "${KV[@]}" --preset llama-3.1-8b --method hysparse
expect kv-bad-schedule 2 'not F or S' -- "${KV[@]}" --preset llama-3.1-8b --method hysparse --schedule FSXS
expect kv-bad-context 2 'not a token count' -- "${KV[@]}" --preset llama-3.1-8b --context 4X
expect kv-overflow 2 'overflows 64 bits' -- "${KV[@]}" --preset hysparse-80b-a3b --context 4611686018427387904
expect kv-bad-dtype 2 'dtype' -- "${KV[@]}" --preset llama-3.1-8b --dtype int4
expect kv-missing-config 3 'cannot open' -- "${KV[@]}" --config "$WORK/missing.json"
echo '{"num_hidden_layers": 2,' > "$WORK/broken.json"
expect kv-broken-config 3 'not valid JSON' -- "${KV[@]}" --config "$WORK/broken.json"
echo '{"num_attention_heads": 8, "head_dim": 64}' > "$WORK/nolayers.json"
expect kv-config-missing-key 3 'num_hidden_layers: missing' -- "${KV[@]}" --config "$WORK/nolayers.json"
expect kv-unwritable 4 'does not exist|not writable' -- "${KV[@]}" --preset llama-3.1-8b -o /nonexistent-dir/kv.h5

echo "kv cli tests: $pass passed, $failures failed"
[[ $failures -eq 0 ]]
