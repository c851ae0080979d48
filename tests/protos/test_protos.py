"""The generated wire-API code is in sync with protos/kubellm/v1/llm.proto."""

import subprocess
import sys


def test_generated_code_matches_the_proto():
    result = subprocess.run([sys.executable, "-m", "kubellm.protos.generate", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_messages_round_trip():
    from kubellm.protos.v1 import llm_pb2

    request = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="hi"), llm_pb2.Prompt(chat=llm_pb2.Conversation(
        messages=[llm_pb2.ChatMessage(role="user", content="hello")]))],
        config=llm_pb2.GenerationConfig(max_new_tokens=5, stop_words=["\n"]))
    again = llm_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert again == request and again.config.HasField("max_new_tokens") and not again.config.HasField("top_p")
    assert [p.WhichOneof("kind") for p in again.prompts] == ["text", "chat"]
