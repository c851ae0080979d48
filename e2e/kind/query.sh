#!/usr/bin/env bash
# Query a kubellm deployment: REST with curl (DeepSpeed-MII and OpenAI routes), then the Python
# gRPC client and the openai client (query.py). Used by run.sh; works against `kubellm serve` too.
#   bash e2e/kind/query.sh GRPC_ADDRESS REST_BASE_URL DEPLOYMENT_NAME [REPLICAS]
set -euo pipefail
grpc=$1 rest=${2%/} name=$3 replicas=${4:-2}
curl -fsS "$rest/mii/$name" -H 'content-type: application/json' \
     -d '{"prompts": ["DeepSpeed is"], "max_length": 32}' | tee /dev/stderr | grep -q '"generated_text"'
echo
curl -fsS "$rest/v1/completions" -H 'content-type: application/json' \
     -d "{\"model\": \"$name\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}" \
     | tee /dev/stderr | grep -q '"choices"'
echo
python "$(dirname "$0")/query.py" "$grpc" "$rest" "$name" "$replicas"
