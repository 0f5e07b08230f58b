"""Inputs the Python API and the CLI refuse with one line (MoetrtError; `error: ...` and exit 1) instead of a
traceback: a malformed generation_config.json, a chat template that does not compile or that raises, messages
without string content, options of the wrong type, and text that is not UTF-8 (a command-line argument in
another encoding reaches Python as lone surrogates)."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from moetrt import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.runtime.requests import RequestError
from moetrt.tasks.chat import ChatTokenizer

NOT_UTF8 = ("is not valid UTF-8 text (byte 0x{byte} at character {at}): pass UTF-8 text (on a command line, check "
            "the shell's locale and the argument's encoding)")
REBUILD = "; correct the checkpoint's generation_config.json and rebuild the engine"
RECOMPILE = ("; correct chat_template in the checkpoint's tokenizer_config.json (or chat_template.jinja) and rebuild "
             "the engine")


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


def engine_with(chat_engine_dir, directory, name: str, text: str):
    """A copy of the chat engine whose `name` holds `text`, recorded in the manifest as a build from a checkpoint
    with that file would record it."""
    shutil.copytree(chat_engine_dir, directory)
    (directory / name).write_text(text)
    manifest = json.loads((directory / "manifest.json").read_text())
    data = (directory / name).read_bytes()
    manifest["artifacts"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def cli(*args) -> subprocess.CompletedProcess:
    """`moetrt ARGS`; bytes arguments go to the process as they are (not UTF-8, say)."""
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *args], capture_output=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The message of a CLI refusal: exit 1, nothing on stdout, one `error: ...` line on stderr."""
    stderr = result.stderr.decode()
    assert (result.returncode, result.stdout, stderr.count("\n"), stderr[:7]) == (1, b"", 1, "error: "), stderr
    return stderr[7:-1]


# -- generation_config.json ----------------------------------------------------------------------------------------

BAD_GENERATION_CONFIGS = [
    ('{"temperature": "0.6"}', "temperature must be a number, got '0.6' (str)"),
    ('{"top_k": 2.5}', "top_k must be an integer, got 2.5 (float)"),
    ('{"do_sample": "yes"}', "do_sample must be true or false, got 'yes' (str)"),
    ('{"max_new_tokens": "many"}', "max_new_tokens must be an integer, got 'many' (str)"),
    ('{"temperature": -1}', "temperature must be >= 0, got -1"),
    ('{"eos_token_id": [1, 1.5]}', "eos_token_id must be a token id or a list of them, got [1, 1.5]"),
    ('{"eos_token_id": "1"}', "eos_token_id must be a token id or a list of them, got '1'"),
    ("[0.6]", "it must hold a JSON object of generation settings, got list"),
    ("{temperature: 0.6}", "cannot read it (Expecting property name enclosed in double quotes: line 1 column 2 "
                           "(char 1))"),
]


@pytest.mark.parametrize("text, problem", BAD_GENERATION_CONFIGS, ids=[t for t, _ in BAD_GENERATION_CONFIGS])
def test_a_malformed_generation_config_is_refused_at_load_with_one_line(chat_engine_dir, tmp_path, text, problem):
    directory = engine_with(chat_engine_dir, tmp_path / "engine", "generation_config.json", text)
    with pytest.raises(MoetrtError) as raised:
        Engine.load(directory)
    assert str(raised.value) == f"{directory / 'generation_config.json'}: {problem}{REBUILD}"


def test_the_cli_refuses_a_malformed_generation_config_with_one_line(chat_engine_dir, tmp_path):
    directory = engine_with(chat_engine_dir, tmp_path / "engine", "generation_config.json", '{"top_p": "high"}')
    message = one_line_error(cli("generate", directory, "hi", "-n", "2"))
    assert message == f"{directory / 'generation_config.json'}: top_p must be a number, got 'high' (str){REBUILD}"


# -- the chat template ---------------------------------------------------------------------------------------------


def with_template(chat_engine_dir, directory, template: str):
    config = json.loads((chat_engine_dir / "tokenizer_config.json").read_text())
    return engine_with(chat_engine_dir, directory, "tokenizer_config.json",
                       json.dumps({**config, "chat_template": template}))


@pytest.mark.parametrize("template, problem", [
    ("{% for m in messages %}{{ m['content'] }}", "(line 1): Unexpected end of template. Jinja was looking for the "
     "following tags: 'endfor' or 'else'. The innermost block that needs to be closed is 'for'"),
    ("{{ messages | no_such_filter }}", "(line 1): No filter named 'no_such_filter'"),
])
def test_a_template_that_does_not_compile_is_refused_at_load(chat_engine_dir, tmp_path, template, problem):
    directory = with_template(chat_engine_dir, tmp_path / "engine", template)
    with pytest.raises(MoetrtError) as raised:
        Engine.load(directory)
    assert str(raised.value) == f"the chat template in {directory} does not compile {problem}{RECOMPILE}"
    assert one_line_error(cli("generate", directory, "hi")) == str(raised.value)


RAISING = ("{% for m in messages %}{% if m['role'] == 'system' %}"
           "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")


def test_the_templates_raise_exception_is_a_refusal_of_the_messages(engine, chat_engine_dir, tmp_path):
    tokenizer = engine.tokenizer
    raising = Engine(engine.manifest, engine.session,
                     ChatTokenizer(tokenizer.tokenizer, RAISING, tokenizer.special_tokens, tokenizer.eos_ids))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for call in (raising.chat_prompt, raising.opens_thinking, raising.chat, raising.chat_stream):
        with pytest.raises(RequestError) as raised:
            call(messages)
        assert (str(raised.value), raised.value.param) == (
            "the chat template refused the conversation: System role not supported", "messages")
    assert raising.chat_prompt(messages[1:]) == tokenizer.encode("hi")
    directory = with_template(chat_engine_dir, tmp_path / "engine", RAISING)
    message = one_line_error(cli("generate", directory, "hi", "--system", "be brief", "-n", "2"))
    assert message == "the chat template refused the conversation: System role not supported"


# -- messages and options in the Python API ------------------------------------------------------------------------

BAD_MESSAGES = [
    ([{"role": "user", "content": None}], "message 1 (user) needs a string 'content', got None: pass its text (a "
     "None content is for an assistant message with tool_calls)"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 2 (assistant) needs a string 'content', "
     "got no content: pass its text (a None content is for an assistant message with tool_calls)"),
    ([{"role": "user", "content": ["hi"]}], "message 1 (user) needs a string 'content', got ['hi']: pass its text "
     "(a None content is for an assistant message with tool_calls)"),
    ([{"content": "hi"}], "message 1 needs a string 'role' ('system', 'user', 'assistant' or 'tool'), got None"),
    ("hi", "messages must be a list of {'role': ..., 'content': ...} dicts, got str"),
    (["hi"], "message 1 must be a dict with 'role' and 'content', got str"),
    ([{"role": "user", "content": "caf\udce9"}], "message 1 (user) " + NOT_UTF8.format(byte="e9", at=3)),
]


@pytest.mark.parametrize("messages, message", BAD_MESSAGES, ids=[m.split(":")[0] for _, m in BAD_MESSAGES])
def test_messages_without_string_content_are_refused(engine, messages, message):
    for call in (engine.chat_prompt, engine.chat, engine.chat_stream, engine.opens_thinking):
        with pytest.raises(RequestError) as raised:
            call(messages)
        assert (str(raised.value), raised.value.param) == (message, "messages")


BAD_OPTIONS = [
    (dict(temperature="0.7"), "temperature must be a number, got '0.7' (str)"),
    (dict(top_p=[0.9]), "top_p must be a number, got [0.9] (list)"),
    (dict(top_k=1.5), "top_k must be an integer, got 1.5 (float)"),
    (dict(max_new_tokens="8"), "max_new_tokens must be an integer, got '8' (str)"),
    (dict(seed=True), "seed must be an integer, got True (bool)"),
    (dict(do_sample="no"), "do_sample must be true or false, got 'no' (str)"),
    (dict(stop=5), "stop must be a string or a list of strings, got 5 (int)"),
    (dict(stop_token_ids=["1"]), "stop_token_ids must be a list of integer token ids, got ['1'] (list)"),
    (dict(stop=["ok", "\udcff"]), "a stop string " + NOT_UTF8.format(byte="ff", at=0)),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[m.split(" must")[0] for _, m in BAD_OPTIONS])
def test_options_of_the_wrong_type_are_refused(engine, options, message):
    messages = [{"role": "user", "content": "hi"}]
    for call in (lambda: engine.chat(messages, **options), lambda: engine.generate("hi", **options),
                 lambda: engine.stream("hi", **options), lambda: engine.options(**options)):
        with pytest.raises(RequestError) as raised:
            call()
        assert (str(raised.value), raised.value.param) == (message, next(iter(options)) if "UTF" not in message
                                                           else "stop")


def test_prompts_that_are_neither_text_nor_ids_or_not_utf8_are_refused(engine):
    with pytest.raises(RequestError, match=r"^a prompt must be text or a list of token ids, got NoneType$"):
        engine.generate(None)
    with pytest.raises(RequestError) as raised:
        engine.generate("12\udcff")
    assert str(raised.value) == "the prompt " + NOT_UTF8.format(byte="ff", at=2)


# -- arguments that are not UTF-8 on the command line --------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    ((b"\xff",), "message 1 (user) " + NOT_UTF8.format(byte="ff", at=0)),
    ((b"12\xe9", "--raw"), "the prompt " + NOT_UTF8.format(byte="e9", at=2)),
    (("hi", "--system", b"\xfe"), "message 1 (system) " + NOT_UTF8.format(byte="fe", at=0)),
    (("hi", "--stop", b"\xff"), "a stop string " + NOT_UTF8.format(byte="ff", at=0)),
])
def test_generate_refuses_arguments_that_are_not_utf8(chat_engine_dir, args, message):
    assert one_line_error(cli("generate", chat_engine_dir, *args, "-n", "2")) == message


def test_chat_refuses_a_system_message_that_is_not_utf8_before_the_first_line(chat_engine_dir):
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "chat", chat_engine_dir, "--system", b"\xfe"],
                            capture_output=True, timeout=300, input=b"hi\n")
    assert one_line_error(result) == "the --system message " + NOT_UTF8.format(byte="fe", at=0)



@pytest.mark.parametrize("options, message", [
    (("-n", "0"), "max_new_tokens must be at least 1, got 0"),
    (("--temperature", "-1"), "temperature must be >= 0, got -1.0"),
])
def test_chat_refuses_options_out_of_range_before_the_first_line(chat_engine_dir, options, message):
    """As `generate` does: one line and exit 1 at start-up, not an error after every line typed and exit 0."""
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "chat", chat_engine_dir, *options],
                            capture_output=True, timeout=300, input=b"hi\n")
    assert one_line_error(result) == message

def test_chat_answers_a_typed_line_that_is_not_utf8_with_an_error_and_goes_on(chat_engine_dir):
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "chat", chat_engine_dir, "-n", "2"],
                            capture_output=True, timeout=300, input=b"caf\xe9\n", env=_strict_stdin())
    assert result.returncode == 0, result.stderr.decode()
    assert b"error: that line is not valid UTF-8 (invalid continuation byte); type UTF-8 text" in result.stdout


def _strict_stdin() -> dict[str, str]:
    """The environment with a strict UTF-8 stdin, as an en_US.UTF-8 locale gives (C.UTF-8 escapes bad bytes)."""
    import os

    return {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
