"""Conversation formats: how a user turn becomes the exact text the judge reads.

The reference request (MLM-Filter scoring scripts) is assembled in three steps:

1. user turn = ``"<image>\\n" + prompt`` (image first, then the filled template);
2. that turn goes into the checkpoint's conversation template with an empty assistant turn;
3. one whitespace token follows the assistant cue, so that the next token is the first digit.

The formats below reproduce step 2 with the strings of the original repositories (rendered as
their ``Conversation.get_prompt()`` does for one user turn and an empty assistant turn):

- ``vicuna_v1``: ``conv_vicuna_v1`` (haotian-liu/LLaVA ``llava/conversation.py``); the LLaVA-1.5
  13B judges. SeparatorStyle.TWO: ``system + " " + "USER: " + msg + " " + "ASSISTANT:"``.
- ``llama3``: ``conv_llama_3`` of the MLM-Filter authors' LLaVA-Llama-3 code
  (Victorwz/LLaVA-Llama-3 ``llava/conversation.py``), the default ``--conv-mode llama_3`` of
  ``mlm_filter_scoring_datacomp_batch_inference_llama_3.py``. It is SeparatorStyle.TWO with the
  Vicuna system prompt and roles and ``<|end_of_text|>`` as stop string, so for one user turn its
  text equals ``vicuna_v1``; only the stop string differs.
- ``llava_llama3``: ``conv_llava_llama_3`` of LLaVA-NeXT, which renders the official Llama-3
  Instruct chat template (header tokens, ``<|eot_id|>``) with the LLaVA system prompt. The
  tokenizer adds ``<|begin_of_text|>`` itself, so the text starts at the first header.
- ``qwen``: ``conv_qwen`` of LLaVA-NeXT (SeparatorStyle.CHATML, "You are a helpful assistant.").
- ``llava_v0``: ``conv_llava_v0`` (SeparatorStyle.SINGLE, ``###``): what the released scripts fall
  back to for names without "v1"/"llama"/"qwen", i.e. the 13B HF names (not how they were trained).
- ``qwen_instruct``: ``conv_qwen_instruct`` of Victorwz/LLaVA-Unified (SeparatorStyle.MPT: no newline
  after ``<|im_end|>``, system "You are a helpful assistant" without a full stop), as the scoring
  script renders it; ``qwen_instruct_train`` is the same text after the ``<s>`` that LLaVA-Unified's
  ``preprocess_qwen`` puts before every training sequence (the released script does not).
- ``aitqe``: AITQE's raw prompt (hanhuang22/AITQE ``inference.py``): no chat template, no BOS;
  the image span, then its processor's own newline (encoded apart), then the question.
- ``auto``: the processor's own chat template (``apply_chat_template`` with one image and the prompt),
  for models that were not trained on one of the formats above.

The image placeholder is family specific (``<image>`` for LLaVA and Idefics3,
``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen2-VL); the backend passes it in.
Step 3 is ``answer_prefix`` (``" "`` for the reference formats, ``""`` for ``auto``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
QWEN_SYSTEM = "You are a helpful assistant."
LLAVA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_UNIFIED_QWEN_SYSTEM = "You are a helpful assistant"
REFERENCE_IMAGE_TOKEN = "<image>"
REFERENCE_ANSWER_PREFIX = " "


def reference_user_turn(prompt: str, image_placeholder: str = REFERENCE_IMAGE_TOKEN) -> str:
    """Step 1 of the reference: the image, a newline, then the filled template."""
    return image_placeholder + "\n" + prompt


@dataclass(frozen=True)
class SeparatorStyleTwo:
    """LLaVA's ``SeparatorStyle.TWO`` conversation, written once for both places that render it.

    :meth:`render_turn` is the judge's request text in Python; :meth:`chat_template` is the same
    conversation as the Jinja chat template a converted LLaVA-1.5 checkpoint's processor carries
    (``apply_chat_template``). ``get_prompt()`` of the original: ``system + sep``, then each turn as
    ``"ROLE: " + message`` followed by ``sep`` (user) or ``sep2`` (assistant), and an empty assistant
    turn as ``"ROLE:"``.
    """

    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def render_turn(self, user_turn: str) -> str:
        """One user turn and the empty assistant cue."""
        user, assistant = self.roles
        return self.system + self.sep + user + ": " + user_turn + self.sep + assistant + ":"

    def chat_template(self, eos_token: str | None = None) -> str:
        """The Jinja chat template rendering this conversation exactly (``eos_token`` ends past answers; default sep2).

        A user message's images come first, each as ``<image>\\n`` (:func:`reference_user_turn`), then
        its text; ``add_generation_prompt`` writes the empty assistant cue. No BOS: the tokenizer adds
        it, as in LLaVA. A system message replaces the default system prompt.
        """
        user, assistant = self.roles
        image_line = _jinja_string(reference_user_turn("", REFERENCE_IMAGE_TOKEN))
        return (
            "{%- set ns = namespace(system=" + json.dumps(self.system) + ") -%}"
            "{%- for message in messages if message['role'] == 'system' -%}"
            "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
            "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text')"
            " | map(attribute='text') | join(' ') -%}{%- endif -%}"
            "{%- endfor -%}"
            "{{- ns.system + " + _jinja_string(self.sep) + " -}}"
            "{%- for message in messages if message['role'] != 'system' -%}"
            "{%- if message['role'] == 'user' -%}{{- " + _jinja_string(user + ": ") + " -}}"
            "{%- else -%}{{- " + _jinja_string(assistant + ": ") + " -}}{%- endif -%}"
            "{%- if message['content'] is string -%}{{- message['content'] -}}"
            "{%- else -%}"
            "{%- for part in message['content'] if part['type'] == 'image' -%}{{- " + image_line + " -}}{%- endfor -%}"
            "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}"
            "{%- endif -%}"
            "{%- if message['role'] == 'user' -%}{{- " + _jinja_string(self.sep) + " -}}"
            "{%- else -%}{{- " + json.dumps(self.sep2 if eos_token is None else eos_token) + " -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + _jinja_string(assistant + ":") + " -}}{%- endif -%}"
        )


def _jinja_string(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


#: conv_vicuna_v1 (haotian-liu/LLaVA): the LLaVA-1.5 13B judges' conversation
VICUNA_V1 = SeparatorStyleTwo(VICUNA_V1_SYSTEM)


def _llava_llama3(user_turn: str) -> str:
    return (
        "<|start_header_id|>system<|end_header_id|>\n\n" + LLAVA_LLAMA3_SYSTEM + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + user_turn.strip() + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _llava_v0(user_turn: str) -> str:
    # SeparatorStyle.SINGLE: system + sep, "ROLE: msg" + sep, empty assistant -> "ROLE:"
    return LLAVA_V0_SYSTEM + "###" + "Human: " + user_turn + "###" + "Assistant:"


def _qwen_instruct(user_turn: str) -> str:
    # SeparatorStyle.MPT: system + sep, then role + msg + sep, empty assistant -> role
    return (
        "<|im_start|>system\n"
        + LLAVA_UNIFIED_QWEN_SYSTEM
        + "<|im_end|>"
        + "<|im_start|>user\n"
        + user_turn
        + "<|im_end|>"
        + "<|im_start|>assistant\n"
    )


def _qwen_instruct_train(user_turn: str) -> str:
    return "<s>" + _qwen_instruct(user_turn)


def _raw(user_turn: str) -> str:
    return user_turn


def _qwen(user_turn: str) -> str:
    # SeparatorStyle.CHATML: system + sep + "\n", "role\n" + msg + sep + "\n", empty assistant -> "role\n"
    return (
        "<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n"
        "<|im_start|>user\n" + user_turn + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@dataclass(frozen=True)
class ConversationFormat:
    """A fixed reference format: renders one user turn plus the empty assistant cue."""

    name: str
    source: str
    render_turn: Callable[[str], str]
    stop: str
    #: text right after the image that the reference encodes as a chunk of its own (AITQE's newline)
    split_after_image: str = ""
    #: one whitespace after the assistant cue (the MLM-Filter scripts); "" for raw prompts
    answer_prefix: str = " "
    #: the answer prefix is appended as one token id (``tokenizer(" ").input_ids[-1]``), as the released
    #: scripts do, instead of being encoded with the text (byte-level BPE would merge "\n " into one token)
    force_answer_token: bool = False

    def render(self, prompt: str, image_placeholder: str) -> str:
        return self.render_turn(reference_user_turn(prompt, image_placeholder + self.split_after_image))

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"name": self.name, "source": self.source, "stop": self.stop}
        if self.force_answer_token:
            described["answer_prefix_as_one_token"] = True
        if self.split_after_image:
            described["encoded_apart_after_image"] = self.split_after_image
        return described


FORMATS: dict[str, ConversationFormat] = {
    "vicuna_v1": ConversationFormat(
        "vicuna_v1", "haotian-liu/LLaVA llava/conversation.py conv_vicuna_v1", VICUNA_V1.render_turn, VICUNA_V1.sep2
    ),
    "llama3": ConversationFormat(
        "llama3",
        "Victorwz/LLaVA-Llama-3 llava/conversation.py conv_llama_3",
        VICUNA_V1.render_turn,
        "<|end_of_text|>",
    ),
    "llava_llama3": ConversationFormat(
        "llava_llama3", "LLaVA-VL/LLaVA-NeXT llava/conversation.py conv_llava_llama_3", _llava_llama3, "<|eot_id|>"
    ),
    "qwen": ConversationFormat("qwen", "LLaVA-VL/LLaVA-NeXT llava/conversation.py conv_qwen", _qwen, "<|im_end|>"),
    "llava_v0": ConversationFormat(
        "llava_v0",
        "Victorwz/LLaVA-Unified llava/conversation.py conv_llava_v0",
        _llava_v0,
        "###",
        force_answer_token=True,
    ),
    "qwen_instruct": ConversationFormat(
        "qwen_instruct",
        "Victorwz/LLaVA-Unified llava/conversation.py conv_qwen_instruct",
        _qwen_instruct,
        "<|im_end|>",
        force_answer_token=True,
    ),
    "qwen_instruct_train": ConversationFormat(
        "qwen_instruct_train",
        "Victorwz/LLaVA-Unified conv_qwen_instruct after the <s> of llava/train/train.py preprocess_qwen",
        _qwen_instruct_train,
        "<|im_end|>",
        force_answer_token=True,
    ),
    "aitqe": ConversationFormat(
        "aitqe", "hanhuang22/AITQE inference.py process_prompt + data_processor.py", _raw, "<|endoftext|>", "\n", ""
    ),
}
AUTO = "auto"
CONVERSATIONS = (AUTO, *FORMATS)


def validate_conversation(name: str) -> str:
    key = (name or AUTO).strip().lower()
    if key not in CONVERSATIONS:
        raise ValueError(f"unknown conversation format {name!r}; known: {', '.join(CONVERSATIONS)}")
    return key


def default_answer_prefix(conversation: str) -> str:
    """Reference formats put one whitespace after the assistant cue; a model's own template does not."""
    return "" if conversation == AUTO else FORMATS[conversation].answer_prefix


def render_with_chat_template(processor: Any, prompt: str) -> str:
    """``auto``: the processor's chat template with one image followed by the prompt, generation cue on."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def end_of_answer(conversation: str, processor: Any = None) -> str:
    """What closes the assistant's answer in training text; the request before it is the judge's own.

    Training text = the judge's request text (conversation + answer prefix, exactly what it sends at
    scoring time) + the answer + this. Reference formats end the answer with their stop string, as
    the reference training conversations do; ``auto`` takes what the processor's chat template
    writes after an assistant message (its end-of-turn), or the tokenizer's EOS when it writes none.
    """
    conversation = validate_conversation(conversation)
    if conversation != AUTO:
        return FORMATS[conversation].stop
    marker = "\x00answer\x00"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": marker}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    end = text.split(marker, 1)[1] if marker in text else ""
    return end if end.strip() else (processor.tokenizer.eos_token or "")
