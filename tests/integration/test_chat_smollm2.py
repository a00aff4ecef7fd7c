"""The default model end to end (what `make run` serves): `tandem serve` without --model serves
SmolLM2-135M-Instruct from its GGUF file; `tandem generate --chat` and `tandem chat` (stdin
piped) talk to it over real gRPC through a real Ray Serve app. One server for the module
(SmolLM2 takes a while to load); generous timeouts."""

import signal
import subprocess
import sys
import time

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from services.engine.model_catalog import default_model_path, smollm2_path
from tests.integration.helpers import free_port, tandem_serve

pytestmark = pytest.mark.timeout(900)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    assert default_model_path() == smollm2_path()  # the wheel is installed: the default is SmolLM2
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with tandem_serve(None, port, log, "--no-redis", timeout_s=600) as proc:
        yield f"127.0.0.1:{port}", proc, log


def cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_prints_a_chat_command_and_generate_chat_names_paris(served):
    address, _, log = served
    text = log.read_text()
    assert "serving SmolLM2-135M-Instruct.Q4_1.gguf" in text and f'generate --address {address} --chat "{QUESTION}"' in text
    out = cli("generate", "--address", address, "--chat", QUESTION)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "finish_reason=stop" in out.stdout, out.stdout
    assert "<|im_end|>" not in out.stdout and "assistant" not in out.stdout.split("[finish_reason")[0]


def test_model_info_says_there_is_a_chat_template_and_messages_are_exclusive(served):
    address = served[0]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        assert info.has_chat_template and info.model_id == "SmolLM2-135M-Instruct.Q4_1.gguf"
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]),
                               timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("prompt:")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(content="hi")]), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("messages[0].role")


def test_chat_keeps_history_across_turns_and_ends_at_eof(served):
    address = served[0]
    out = cli("chat", "--address", address, "--usage", "--max-tokens", "48",
              stdin=f"{QUESTION}\nAnd what is its most famous tower called?\n")
    assert out.returncode == 0, out.stderr
    usage = [line for line in out.stdout.splitlines() if line.startswith("[finish_reason=")]
    assert len(usage) == 2 and "Paris" in out.stdout, out.stdout
    tokens = [dict(kv.split("=") for kv in line.strip("[]").split()) for line in usage]
    first, second = ({k: int(v) for k, v in t.items() if k != "finish_reason"} for t in tokens)
    # the second turn's prompt holds the first question and answer: history was sent
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]
    assert "Traceback" not in out.stderr


def test_chat_ends_cleanly_on_ctrl_c(served):
    address = served[0]
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "chat", "--address", address, "--max-tokens", "8"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(QUESTION + "\n")
        proc.stdin.flush()
        proc.stdout.readline()  # the first reply (one line: it ends with a newline) is in: now waiting on stdin
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
