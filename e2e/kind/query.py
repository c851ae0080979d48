"""Query a kubellm deployment through its router: the Python gRPC client, DeepSpeed-MII's
`POST /mii/<name>`, then the openai client against the REST gateway (completions, chat, chat
streamed). Exits non-zero on any empty or failed answer. Used by e2e/kind/run.sh and by the
real-pod tier (e2e/test_realpods.py).

    python e2e/kind/query.py GRPC_ADDRESS REST_BASE_URL DEPLOYMENT_NAME [REPLICAS]
"""

from __future__ import annotations

import json
import sys
import urllib.request

from openai import OpenAI

from kubellm.runtime.serving.client import Client


def main(grpc_address: str, rest_url: str, name: str, expected_replicas: int = 2) -> int:
    client = Client(grpc_address)
    responses = client.generate(["The capital of France is", "Kubernetes is"], max_new_tokens=16)
    for response in responses:
        print(f"gRPC: {response.text!r} ({response.generated_length} tokens, {response.finish_reason}, "
              f"replica {response.replica})")
        assert response.text and response.generated_length > 0, response
    # The router round-robins requests over the replicas.
    replicas = {client.generate("Hello", max_new_tokens=2)[0].replica for _ in range(4)}
    print(f"replicas answering: {sorted(replicas)}")
    assert len(replicas) == expected_replicas, replicas
    streamed = "".join(delta.text for delta in client.stream("Count to five:", max_new_tokens=16))
    print(f"gRPC stream: {streamed!r}")
    assert streamed

    request = urllib.request.Request(f"{rest_url.rstrip('/')}/mii/{name}", method="POST",
                                     data=json.dumps({"prompts": ["DeepSpeed is"], "max_length": 32}).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        mii = json.loads(reply.read())
    print(f"POST /mii/{name}: {mii}")
    assert mii and all(item.get("generated_text") for item in (mii if isinstance(mii, list) else [mii])), mii

    openai = OpenAI(base_url=f"{rest_url.rstrip('/')}/v1", api_key="unused")
    assert name in [m.id for m in openai.models.list().data]
    completion = openai.completions.create(model=name, prompt="Seattle is", max_tokens=16)
    print(f"openai completions: {completion.choices[0].text!r}")
    chat = openai.chat.completions.create(model=name, max_tokens=16,
                                          messages=[{"role": "user", "content": "Say hello."}])
    print(f"openai chat: {chat.choices[0].message.content!r}")
    assert completion.choices[0].text and chat.choices[0].message.content
    stream = openai.chat.completions.create(model=name, max_tokens=16, stream=True,
                                            messages=[{"role": "user", "content": "Name three colours."}])
    chunks = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    print(f"openai chat streamed in {len(chunks)} chunks: {''.join(chunks)!r}")
    assert len(chunks) > 1 and "".join(chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4], *map(int, sys.argv[4:5])))
