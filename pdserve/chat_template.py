"""Chat templates: choosing a model directory's template and rendering it the way HF does.

Templates are Jinja2 run in an immutable sandbox, since a model directory is not trusted code.
Rendering errors (a template's `raise_exception`, a malformed message) surface as `ValueError`,
which the HTTP layer turns into a 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ERNIE-4.5's template (DESIGN.md section 6), written for pdserve. Unlike the checkpoint's own
# template it rejects unknown roles instead of silently dropping them.
ERNIE45_CHAT_TEMPLATE = r"""
{%- if cls_token is not defined -%}{%- set cls_token = "<|begin_of_sentence|>" -%}{%- endif -%}
{%- if sep_token is not defined -%}{%- set sep_token = "<|end_of_sentence|>" -%}{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
    {%- if message["role"] == "system" -%}
        {{- message["content"] + "\n" -}}
    {%- elif message["role"] == "user" -%}
        {{- "User: " + message["content"] + "\n" -}}
    {%- elif message["role"] == "assistant" -%}
        {{- "Assistant: " + message["content"] + sep_token -}}
    {%- else -%}
        {{- raise_exception("unknown chat role: " ~ message["role"]) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "Assistant: " -}}
{%- endif -%}
""".strip()


class ChatTemplateError(ValueError):
    """A chat template refused the conversation (its `raise_exception`) or failed to render."""


def select_chat_template(config: Mapping[str, Any], jinja_file: str | None) -> str:
    """The template source a model directory specifies.

    Order: `chat_template` in tokenizer_config.json (a string, or HF's list of named templates, of
    which "default" is taken), then the text of chat_template.jinja, then ERNIE-4.5's template.
    """
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(
                f"tokenizer_config.json chat_template lists {sorted(map(str, named))} "
                "but no template named 'default'"
            )
        template = named["default"]
    if isinstance(template, str) and template:
        return template
    if jinja_file:
        return jinja_file
    return ERNIE45_CHAT_TEMPLATE


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile `source` in a sandbox with HF's settings and helpers; ValueError if malformed."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e} (line {e.lineno})") from e


def _content_text(content: Any, index: int) -> str:
    """Flatten OpenAI content (a string, None, or a list of text parts) to a string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"messages[{index}].content must be a string or a list of parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"messages[{index}].content has an unsupported part type: {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` with each content flattened to a string; ValueError if malformed."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        out.append({**message, "content": _content_text(message.get("content"), i)})
    return out


def render_chat_template(
    template: jinja2.Template,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    template_kwargs: Mapping[str, Any],
) -> str:
    """Render a conversation to prompt text.

    `special_tokens` maps names such as "bos_token" and "cls_token" to their strings; the
    template sees them, `messages`, `add_generation_prompt`, and `template_kwargs`.
    """
    context = {
        **special_tokens,
        **template_kwargs,
        "messages": normalize_messages(messages),
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return template.render(**context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e
