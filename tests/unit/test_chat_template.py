"""Chat templates of Hugging Face folders (tokenizer_config.json ``chat_template``, or
chat_template.jinja) rendered exactly as transformers' ``apply_chat_template`` renders them,
with templates that lean on what the environment must provide: trim_blocks/lstrip_blocks,
namespace, loop controls, tojson without HTML escaping, raise_exception, the generation tag
and the special-token variables. Errors are ValueErrors naming the cause."""

from __future__ import annotations

import json
import re

import pytest

from services.engine.chat_template import ChatTemplate, ChatTemplateError
from services.engine.make_model import make_model
from services.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

HEADERS = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system = 'You are helpful.' %}\n"
    "{%- endif %}\n"
    "{{- '<|start|>system<|sep|>\\n\\n' + system + '<|im_end|>' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start|>' + message['role'] + '<|sep|>\\n\\n' + message['content'] | trim + '<|im_end|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start|>assistant<|sep|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
# block tags on their own indented lines and no '-' modifiers: only trim/lstrip_blocks keep it tidy
BLOCKS = (
    "{% set ns = namespace(turns=0, last_user='') %}\n"
    "{% if messages[0].role == 'system' %}\n"
    "SYSTEM: {{ messages[0].content }}\n"
    "{% endif %}\n"
    "{% for m in messages %}\n"
    "    {% if m.role == 'system' %}\n"
    "        {% continue %}\n"
    "    {% endif %}\n"
    "    {% set ns.turns = ns.turns + 1 %}\n"
    "    {% if m.role == 'user' %}{% set ns.last_user = m.content %}{% endif %}\n"
    "<|im_start|>{{ m.role }}\n"
    "    {% if m.role == 'assistant' %}\n"
    "{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>\n"
    "    {% else %}\n"
    "{{ m.content }}<|im_end|>\n"
    "    {% endif %}\n"
    "    {% if loop.index > 6 %}{% break %}{% endif %}\n"
    "{% endfor %}\n"
    "{{ {'turns': ns.turns, 'last': ns.last_user, 'final': messages[-1]} | tojson }}\n"
    "{{ messages[-1] | tojson(indent=2, sort_keys=true) }}\n"
    "{% if add_generation_prompt %}\n"
    "<|im_start|>assistant\n"
    "{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hello <b>there</b> & café 😀"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"},
     {"role": "assistant", "content": "four\n\nfive"}, {"role": "user", "content": "\"quoted\" \\ back"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c", "name": "carol"}],
]


def _folder(tmp_path, template: str, as_file: bool):
    path = make_model("tiny-llama", tmp_path / "m")
    if as_file:
        (path / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("as_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
@pytest.mark.parametrize("template", [HEADERS, BLOCKS], ids=["headers", "blocks"])
def test_matches_apply_chat_template(tmp_path, template, as_file):
    path = _folder(tmp_path, template, as_file)
    ours, hf = Tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_raise_exception_becomes_value_error(tmp_path):
    ours = Tokenizer(_folder(tmp_path, HEADERS, as_file=False))
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="chat template: Conversation roles must alternate"):
        ours.apply_chat_template(bad)


def test_sandbox_refuses_python_internals():
    with pytest.raises(ChatTemplateError, match="chat template"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="'_x'"):
        ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


@pytest.mark.parametrize("messages, field", [
    ([], "messages"), ("hi", "messages"), ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": "a", "extra": object()}], "messages[0]"), (["x"], "messages[0]"),
])
def test_malformed_messages_name_the_field(messages, field):
    with pytest.raises(ValueError, match="^" + re.escape(field) + "[:]"):
        ChatTemplate("{{ messages }}").render(messages)


def test_folder_without_template(tmp_path):
    ours = Tokenizer(make_model("tiny-llama", tmp_path / "m"))
    assert ours.chat_template is None and ours.stop_token_ids == ()
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


def test_end_of_turn_token_in_template_is_a_stop_id(tmp_path):
    ours = Tokenizer(_folder(tmp_path, BLOCKS, as_file=False))
    assert ours.stop_token_ids == (ours.token_to_id("<|im_end|>"),) == (3,)
    assert ours.special_tokens == {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
