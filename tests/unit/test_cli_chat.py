"""The chat commands' argument handling, without a server."""

from router import cli
from services.engine.make_model import make_model
from services.engine.model_catalog import smollm2_path


def test_generate_takes_exactly_one_of_prompt_and_chat(capsys):
    assert cli.main(["generate", "--address", "127.0.0.1:1", "text", "--chat", "hi"], entry_points=[]) == 2
    assert cli.main(["generate", "--address", "127.0.0.1:1"], entry_points=[]) == 2
    assert "exactly one of PROMPT" in capsys.readouterr().err
    args = cli.build_parser([]).parse_args(["chat", "--usage", "--system", "Be brief."])
    assert args.handler is cli._chat and args.usage and args.system == "Be brief." and args.max_tokens == 512


def test_the_printed_client_command_is_a_chat_when_the_model_has_a_template(tmp_path):
    chat = cli._try_command(str(smollm2_path()), cli.DEFAULT_ADDRESS)
    assert chat.startswith('generate --chat "What is the capital of France?"') and "chat" in chat.split("(or: ")[1]
    plain = cli._try_command(str(make_model("tiny-llama", tmp_path)), "127.0.0.1:7")
    assert plain == 'generate --address 127.0.0.1:7 "The for statement"'
