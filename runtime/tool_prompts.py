"""Tools shown to a DeepSeek model whose chat template ignores `tools`: moetrt's own preamble for the system turn,
listing the functions and the exact tool-call format the checkpoint was trained on. (Reading the calls back:
runtime/tool_parsers.py.)

DeepSeek's published templates (V3, V3-0324, R1, R1-0528, V3.1) render a conversation's tool-call turns and tool
outputs but never read `tools`: DeepSeek's API and the servers around these checkpoints describe the tools in the
system prompt instead. vLLM (examples/tool_chat_template_deepseekv3.jinja, ..._deepseekr1.jinja,
..._deepseekv31.jinja) and SGLang (examples/chat_template/) ship replacement templates that do so, and
DeepSeek-V3.1's model card documents its own tool prompt; moetrt follows the same convention with its own text,
and keeps the checkpoint's template for everything else. The call format shown is the one the template writes back
for earlier calls (`call_form` renders a probe turn to find it): V3/R1's

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(several calls one per line), or V3.1's `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS
<｜tool▁call▁end｜><｜tool▁calls▁end｜>` (several calls back to back). runtime/text.py `ChatEncoder` merges the
preamble into the system turn as template text: its markers become the control tokens (as in the templates above),
while the tool definitions in it stay protected like message text.
"""

from __future__ import annotations

import json
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.runtime.requests import RequestError

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

V3, V3_1 = "v3", "v3.1"  # V3's form covers V3, V3-0324, R1 and R1-0528
CALL_SEPARATOR = {V3: "\n", V3_1: ""}  # between two calls of one section, as the templates write them

_PROBE = "moetrt_probe"
# how each form starts a call to _PROBE: V3 names the type, then the function; V3.1 the function alone
_PROBE_START = {V3: f"{CALL_BEGIN}function{SEP}{_PROBE}\n", V3_1: f"{CALL_BEGIN}{_PROBE}{SEP}"}


def write_call(form: str, name: str, arguments: str) -> str:
    """One call as the model writes it in `form` (V3 or V3_1), from `<｜tool▁call▁begin｜>` to
    `<｜tool▁call▁end｜>`; `arguments`: a JSON object as text."""
    if form == V3:
        return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"
    return f"{CALL_BEGIN}{name}{SEP}{arguments}{CALL_END}"


def call_form(tokenizer) -> str:
    """The tool-call form (V3 or V3_1) that `tokenizer`'s chat template writes for an assistant turn with
    tool_calls: the form its model was trained on. `tokenizer`: a ChatTokenizer. Raises RequestError (param
    "tools") when the tokenizer lacks DeepSeek's tool-call tokens or the template writes no such call."""
    missing = [marker for marker in MARKERS if tokenizer.token_id(marker) is None]
    if missing:
        raise RequestError(f"this engine's chat template does not render tools and its tokenizer has no "
                           f"{missing[0]} token, so its model can neither be shown tools nor call them: leave out "
                           "tools, or give the engine a chat template that renders `tools`", param="tools")
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": _PROBE, "arguments": "{}"}}]}]
    from jinja2 import TemplateError

    try:
        written = tokenizer.render(probe, add_generation_prompt=False)
    except (MoetrtError, TemplateError, TypeError, ValueError, LookupError, AttributeError):
        written = ""  # the template refuses tool-call turns: it writes none
    for form, start in _PROBE_START.items():
        if start in written:
            return form
    raise RequestError("this engine's chat template renders neither `tools` nor DeepSeek's tool calls, so the "
                       "model would never see the tools nor learn how to call them: leave out tools, or give the "
                       "engine a chat template that renders `tools`", param="tools")


def tool_preamble(tools: list[dict[str, Any]], form: str) -> str:
    """The system turn's text describing `tools` (OpenAI's tool objects, checked by requests.check_tools): each
    function (name, description, parameters' JSON schema) as one line of JSON, then the call format in `form`.
    Raises RequestError (param "tools") for a tool that is not JSON (a Python object in its schema)."""
    lines = []
    for number, tool in enumerate(tools, 1):
        try:
            lines.append(json.dumps(tool["function"], ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise RequestError(f"tool {number} cannot be written as JSON ({error})", param="tools") from None
    several = "one per line" if form == V3 else "directly one after another"
    return (
        "## Tools\n\n"
        "You can call the functions below. Each line is one function as JSON: its name, what it does and the JSON "
        "schema of its parameters.\n\n"
        + "\n".join(lines) + "\n\n"
        "To call a function, write exactly this, where NAME is one of the functions above and ARGUMENTS is one JSON "
        "object that follows its parameters' schema:\n\n"
        f"{CALLS_BEGIN}{write_call(form, 'NAME', 'ARGUMENTS')}{CALLS_END}\n\n"
        f"To make several calls at once, write the calls, each from {CALL_BEGIN} to {CALL_END}, {several} between "
        f"one {CALLS_BEGIN} and one {CALLS_END}. The results come back as tool outputs. When no function helps, "
        "answer without calling one."
    )


def with_tool_preamble(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                       form: str) -> list[dict[str, Any]]:
    """`messages` with `tool_preamble(tools, form)` appended to the last system message's content (after a blank
    line), or as a new first system message when there is none. The last one, because R1's template keeps only the
    last system message and V3's joins them all: either way the preamble is rendered once."""
    preamble = tool_preamble(tools, form)
    systems = [index for index, message in enumerate(messages) if message.get("role") == "system"]
    if not systems:
        return [{"role": "system", "content": preamble}, *messages]
    last = systems[-1]
    content = messages[last].get("content")
    merged = {**messages[last], "content": f"{content}\n\n{preamble}" if content else preamble}
    return [*messages[:last], merged, *messages[last + 1 :]]

