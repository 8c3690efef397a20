"""The MLM judge behind an OpenAI-compatible server (``vllm serve``, SGLang, llama.cpp's server, a hosted model).

``--backend openai --base-url URL``. Every prompt is one chat completion: the image as a base64 data URL,
then the metric prompt (the released text, :mod:`mlmfilter.judge.prompts`), temperature 0. The HTTP
side (bounded concurrency, retries honouring ``retry-after``, the sqlite request cache, counters) is the
project's one client, :class:`mlmfilter.clients.ChatClient`; this module only builds bodies and reads answers.

Conversation format: only ``auto``, which here means THE SERVER'S chat template (it renders the turn).
The reference formats (``vicuna_v1``, ``llama3`` ...) are exact raw prompt texts; they would need the
completions endpoint with the raw prompt AND the image, and no standard OpenAI-compatible API takes an
image on ``/v1/completions`` (vLLM takes ``multi_modal_data`` with a raw prompt only offline: use
``--backend vllm``), so they are refused here with that reason.

Readouts:

- ``generate``: the greedy answer text (``max_tokens`` enough to write "100" and see it end).
- ``expected`` from top-k log-probabilities (``logprobs`` / ``top_logprobs``, OpenAI's format, which
  vLLM and SGLang return too; with ``token_ids`` vLLM's ``return_tokens_as_token_ids`` names tokens by
  id, so no text-to-token guessing). One request per prompt, ``max_tokens`` = the score trie's depth + 1;
  the answer's steps walk the score trie (:class:`~mlmfilter.judge.readout.ScoreTrie` of the judge's
  tokenizer, which must be loadable locally) ALONG THE GREEDY PATH:

  * at every step the top-k entries give P(child token | node) for the trie children they include and
    a lower bound of P(next token starts with a digit); the probability outside the top-k is unplaced;
  * a child other than the greedy one cannot be continued from this answer: it is taken to stop there
    (its whole path probability goes to its number, numbers under it get 0) and its path probability
    is unplaced (as an unexpanded node of the adaptive trie);

  so per prompt ``unplaced`` = sum over walked nodes of P(node) * (1 - top-k mass) + sum over
  non-greedy children of P(child), and every P(s) is within ``unplaced`` of the exact value (the L1
  distance of the unnormalised distributions within ``2 * unplaced``). The scorer writes it as the
  ``<metric>_unplaced`` column: the row's own bound. For a one-token-per-number tokenizer (Llama-3) the
  first step's top-k alone places almost all mass when k covers the likely numbers; for a
  digit-by-digit tokenizer (SmolLM2, Qwen) the second digit is known only under the greedy first
  digit, so a judge undecided between first digits has a large ``unplaced`` -- stated, not hidden.

  With ``trie_walk="continue_final_message"`` (vLLM's and SGLang's prefill extension) the backend walks
  the whole adaptive trie instead, as the transformers backend does: a round of 1-token requests per
  trie level, each with the node's digits prefilled as the assistant's message, nodes below
  ``trie_threshold`` not expanded. ``unplaced`` is then the top-k misses at the computed nodes plus the
  unexpanded nodes' path probabilities; with the whole vocabulary as top-k and threshold 0 it is the
  exact readout (tested). It costs one request per expanded node (up to ~100 per prompt for a
  digit-by-digit tokenizer; the server's prefix cache makes each a short prefill) and is refused when
  the model's chat template renders a prefilled answer differently from its generation cue + answer.

A server that returns no log-probabilities (``transformers serve`` returns ``logprobs: null``) makes
the expected readout impossible: :class:`~mlmfilter.judge.backend.LogprobsMissing`, one clear line.
"""

from __future__ import annotations

import io
import math
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field

from mlmfilter.backends.base import BackendInfo
from mlmfilter.clients.chat import ServerSettings, user_message
from mlmfilter.judge.backend import (
    BackendCapabilities,
    JudgeRequest,
    LogprobsMissing,
    RequestFailure,
    TopKDistribution,
)
from mlmfilter.judge.conversations import AUTO
from mlmfilter.judge.readout import DIGITS, SCORES, ScoreTrie

#: error reasons of a judge request (column values: keep them stable)
JUDGE_REQUEST_FAILED = "judge_request_failed"  # HTTP error, timeout or connection failure after all retries
JUDGE_BAD_RESPONSE = "judge_bad_response"  # a 200 that is not a usable chat completion

TOP_K_DEFINITION = (
    "P(s) from the server's top-k log-probabilities along the greedy answer: P(canonical tokens of str(s)) "
    "* P(next token does not start with a digit), where a token outside the top-k counts 0 and a trie node "
    "off the greedy path is taken to stop there; score = sum s P(s) / mass, mass = sum P(s), std as exact"
)
TOP_K_BOUND = (
    "per row <metric>_unplaced: mass outside the returned top-k at every walked node plus the path "
    "probability of every trie node off the greedy path; every P(s) is within it of exact, "
    "the L1 distance of the unnormalised distributions within twice it"
)
WALK_DEFINITION = (
    "P(s) = P(canonical tokens of str(s) | prompt) * P(next token does not start with a digit), from the server's "
    "top-k log-probabilities at every score-trie node (the node's digits prefilled as the assistant message, "
    "continue_final_message), nodes below trie_threshold not expanded; a token outside the top-k counts 0; "
    "score = sum s P(s) / mass, mass = sum P(s), std as exact"
)
WALK_BOUND = (
    "per row <metric>_unplaced: mass outside the returned top-k at every computed trie node plus the path "
    "probability of every node left unexpanded (each below trie_threshold); every P(s) is within it of exact, "
    "the L1 distance of the unnormalised distributions within twice it"
)


class OpenAIOptions(ServerSettings):
    """``backend_options`` of ``--backend openai`` (``--base-url`` sets ``base_url``): how the server is
    reached (:class:`~mlmfilter.clients.chat.ServerSettings`: operational, not part of the run's identity;
    partition jobs may each use their own replica of the served model, whose name, ``served_model``, stays
    in the identity) and what is asked."""

    #: the model name the server knows; None: the scorer's ``model``
    served_model: str | None = None
    #: where the judge's tokenizer is (expected readout: which tokens spell 0..100); None: ``model``
    tokenizer: str | None = None
    #: shorter side images are decoded to before they are sent
    image_size: int = Field(448, ge=16)
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    #: expected readout: how many log-probabilities per step (OpenAI allows up to 20; vLLM up to its max_logprobs)
    top_logprobs: int = Field(20, ge=1)
    #: expected readout: ask for tokens named by id (vLLM's return_tokens_as_token_ids); else by text
    token_ids: bool = False
    #: expected readout: "greedy" reads one answer per prompt; "continue_final_message" walks the score
    #: trie like the transformers backend (adaptive, trie_threshold), one 1-token request per trie node,
    #: the node's digits prefilled as the assistant's message (vLLM's / SGLang's continue_final_message)
    trie_walk: Literal["greedy", "continue_final_message"] = "greedy"


# -- plain functions ----------------------------------------------------------------------------------


def refuse_unservable(conversation: str, answer_prefix: str | None) -> None:
    """The request formats a chat endpoint cannot reproduce, refused with the reason."""
    if conversation != AUTO:
        raise ValueError(
            f"conversation {conversation!r} is a reference prompt format: it needs the raw prompt text with the image, "
            "i.e. a completions endpoint taking images, which no standard OpenAI-compatible API offers (vLLM takes a raw "
            "prompt with multi_modal_data only offline). Use --backend vllm or transformers for it, or conversation=auto "
            "(the server's chat template)"
        )
    if answer_prefix:
        raise ValueError(
            "answer_prefix cannot be sent to a chat endpoint (the server writes the assistant cue); leave it unset"
        )


def decoded_image_url(image: Any, image_format: str = "jpeg", quality: int = 95) -> str:
    """A decoded PIL image, encoded again, as a ``data:`` URL (deterministic bytes: the request cache key)."""
    from mlmfilter.clients.chat import image_data_url

    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return image_data_url(buffer.getvalue(), image_format)


def chat_body(
    model: str,
    image_url: str,
    prompt: str,
    max_tokens: int,
    top_logprobs: int | None = None,
    token_ids: bool = False,
    answer_start: str | None = None,
) -> dict[str, Any]:
    """One judge prompt as a chat completion body: image first, then the metric prompt, greedy.

    ``answer_start``: the assistant's answer so far (a trie node's digits), continued by the server
    (``continue_final_message``, no new generation cue) instead of a fresh answer.
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": [user_message(prompt, image_url)],
        "temperature": 0.0,
        "max_tokens": int(max_tokens),
    }
    if answer_start is not None:
        body["messages"].append({"role": "assistant", "content": answer_start})
        body["add_generation_prompt"] = False
        body["continue_final_message"] = True
    if top_logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = int(top_logprobs)
        if token_ids:
            body["return_tokens_as_token_ids"] = True
    return body


class TokenNames:
    """Maps a server's token names (text, or vLLM's ``token_id:N``) to what the trie walk needs."""

    def __init__(self, trie: ScoreTrie, tokenizer: Any):
        self.trie = trie
        self.continuation = set(trie.continuation_ids)
        self.by_text: dict[str, int] = {}
        for token in sorted(set(trie.edge_tokens)):
            self.by_text.setdefault(tokenizer.decode([token]), token)

    def token_id(self, name: str) -> int | None:
        if name.startswith("token_id:"):
            try:
                return int(name.split(":", 1)[1])
            except ValueError:
                return None
        return self.by_text.get(name)

    def starts_with_digit(self, name: str) -> bool:
        token = self.token_id(name) if name.startswith("token_id:") else None
        if token is not None:
            return token in self.continuation
        return name[:1] in DIGITS


def top_k_distribution(steps: Sequence[dict[str, Any]], trie: ScoreTrie, names: TokenNames) -> tuple[np.ndarray, float]:
    """OpenAI ``logprobs.content`` of one greedy answer -> (log P(s) for s = 0..100, unplaced mass).

    See the module docstring for the walk and the bound.
    """
    children: dict[int, dict[int, int]] = {}  # node (-1 root) -> token id -> child node
    for n, node in enumerate(trie.nodes):
        children.setdefault(node.parent, {})[node.token_id] = n
    terminal_of = {end: s for s, end in enumerate(trie.terminal)}
    prob = np.zeros(len(SCORES))
    unplaced = 0.0
    node, path = -1, 1.0  # current node and its path probability P(t_1 .. t_k | prompt)
    for depth, step in enumerate(steps):
        entries = [
            (str(e.get("token", "")), float(e.get("logprob", -math.inf))) for e in step.get("top_logprobs") or []
        ]
        chosen = names.token_id(str(step.get("token", "")))
        covered = min(1.0, sum(math.exp(lp) for _, lp in entries))
        unplaced += path * (1.0 - covered)
        if node >= 0:  # P(the number stops at this node); the continuation is a lower bound (top-k)
            p_continue = min(1.0, sum(math.exp(lp) for name, lp in entries if names.starts_with_digit(name)))
            if node in terminal_of:
                prob[terminal_of[node]] += path * (1.0 - p_continue)
        next_node, next_path = None, 0.0
        for name, lp in entries:
            child = children.get(node, {}).get(names.token_id(name))
            if child is None:
                continue
            p = path * math.exp(lp)
            if names.token_id(name) == chosen:
                next_node, next_path = child, p
            else:  # off the greedy path: taken to stop here, its whole mass unplaced
                if child in terminal_of:
                    prob[terminal_of[child]] += p
                unplaced += p
        if next_node is None:
            break
        node, path = next_node, next_path
        if depth == len(steps) - 1:  # the answer ended inside a number: its stop probability is unknown
            if node in terminal_of:
                prob[terminal_of[node]] += path
            unplaced += path
    with np.errstate(divide="ignore"):
        return np.log(prob), min(1.0, unplaced)


def step_reductions(step: dict[str, Any], trie: ScoreTrie, names: TokenNames) -> tuple[float, list[float], float]:
    """One step's top-k entries -> (log P(next starts with a digit) (a lower bound), log-prob of each of
    the readout's tokens (``sorted(set(trie.edge_tokens))``, -inf when outside the top-k), top-k mass)."""
    entries = [(str(e.get("token", "")), float(e.get("logprob", -math.inf))) for e in step.get("top_logprobs") or []]
    covered = min(1.0, sum(math.exp(lp) for _, lp in entries))
    digits = [lp for name, lp in entries if names.starts_with_digit(name)]
    log_continue = min(0.0, float(np.logaddexp.reduce(digits))) if digits else -math.inf
    by_id = {names.token_id(name): lp for name, lp in entries}
    return log_continue, [by_id.get(t, -math.inf) for t in sorted(set(trie.edge_tokens))], covered


def walk_unplaced(readout: Any, covered: np.ndarray) -> np.ndarray:
    """Per row of an :class:`AdaptiveTrieReadout` fed from top-k steps: sum over computed contexts of
    P(context) * (1 - top-k mass) plus the path probability of every node left unexpanded."""
    import torch

    trie = readout.trie
    contexts = torch.as_tensor(trie.edge_contexts)
    paths = trie.node_log_paths(readout.edge_logits() - readout.lse[:, contexts]).exp().double().numpy()
    context_prob = np.concatenate([np.ones((paths.shape[0], 1)), paths], axis=1)  # context 0 is the root
    done = readout.done.numpy()
    missed = (context_prob * (1.0 - covered) * done).sum(axis=1)
    frontier = (~done[:, 1:]) & done[:, contexts.numpy()]
    return np.minimum(1.0, missed + (paths * frontier).sum(axis=1))


def response_logprobs(response: dict[str, Any]) -> list[dict[str, Any]] | None:
    """``choices[0].logprobs.content`` or None when the server sent none."""
    try:
        content = (response["choices"][0].get("logprobs") or {}).get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return content if isinstance(content, list) and content else None


def readout_provenance(options: Any) -> dict[str, str]:
    """The expected readout this backend computes for MLMOptions: its definition and error bound."""
    if OpenAIOptions(**options.backend_options).trie_walk == "continue_final_message":
        return {"readout_definition": WALK_DEFINITION, "readout_bound": WALK_BOUND}
    return {"readout_definition": TOP_K_DEFINITION, "readout_bound": TOP_K_BOUND}


def describe_settings(options: Any) -> dict[str, Any]:
    """Provenance of the backend from its settings alone (before, and without, any request)."""
    settings = OpenAIOptions(**options.backend_options)
    return {
        "backend": "openai",
        "model": options.model,
        "served_model": settings.served_model or options.model,
        "base_url": settings.base_url,
        "conversation": {"name": AUTO, "source": "the server's chat template"},
        "answer_prefix": "",
        "image": {
            "shorter_side": settings.image_size,
            "format": settings.image_format,
            **({"jpeg_quality": settings.jpeg_quality} if settings.image_format == "jpeg" else {}),
        },
        "distribution": "top-k log-probabilities along the greedy answer" if options.readout == "expected" else None,
        "top_logprobs": settings.top_logprobs if options.readout == "expected" else None,
        "tokens_named_by": ("id (return_tokens_as_token_ids)" if settings.token_ids else "text")
        if options.readout == "expected"
        else None,
        "trie_walk": settings.trie_walk if options.readout == "expected" else None,
    }


# -- the backend --------------------------------------------------------------------------------------


class OpenAIJudgeBackend:
    """The JudgeBackend over an OpenAI-compatible chat endpoint; ``client`` is a ChatClient."""

    def __init__(self, options: Any, settings: OpenAIOptions, client: Any, tokenizer: Any = None):
        refuse_unservable(options.conversation, options.answer_prefix)
        self.options = options
        self.settings = settings
        self.client = client
        self.model = settings.served_model or options.model
        self.tokenizer = tokenizer
        self.trie = ScoreTrie.from_tokenizer(tokenizer) if tokenizer is not None else None
        self.names = TokenNames(self.trie, tokenizer) if self.trie is not None else None
        self.warnings: list[str] = []

    @property
    def capabilities(self) -> BackendCapabilities:
        distribution = "top_k" if self.trie is not None else "none"
        return BackendCapabilities(distribution, self.settings.image_size, self.settings.max_concurrency)

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    def _max_tokens(self, max_new_tokens: int | None = None) -> int:
        return int(max_new_tokens or (self.trie.max_new_tokens if self.trie is not None else 4))

    def _ask(
        self, requests: Sequence[JudgeRequest], max_tokens: int, top_logprobs: int | None
    ) -> dict[tuple[int, int], Any]:
        from mlmfilter.clients.chat import ChatRequest

        def bodies():
            for r, request in enumerate(requests):
                url = decoded_image_url(request.image, self.settings.image_format, self.settings.jpeg_quality)
                for p, prompt in enumerate(request.prompts):
                    body = chat_body(self.model, url, prompt, max_tokens, top_logprobs, self.settings.token_ids)
                    yield ChatRequest(body, tag=(r, p))

        return {result.tag: result for result in self.client.complete_many(bodies())}

    @staticmethod
    def _failure(result) -> RequestFailure:
        from mlmfilter.clients.chat import BAD_RESPONSE

        reason = JUDGE_BAD_RESPONSE if result.error == BAD_RESPONSE else JUDGE_REQUEST_FAILED
        return RequestFailure(reason, result.error_detail or result.error or "")

    def generate(
        self, requests: Sequence[JudgeRequest], max_new_tokens: int | None = None
    ) -> list[list[str] | RequestFailure]:
        results = self._ask(requests, self._max_tokens(max_new_tokens), None)
        out: list[Any] = []
        for r, request in enumerate(requests):
            answers = [results[(r, p)] for p in range(len(request.prompts))]
            failed = next((a for a in answers if not a.ok), None)
            out.append(self._failure(failed) if failed is not None else [a.text for a in answers])
        return out

    def score_distributions(self, requests: Sequence[JudgeRequest]) -> list[TopKDistribution | RequestFailure]:
        if self.trie is None:
            raise LogprobsMissing("the expected readout needs the judge's tokenizer (backend option tokenizer)")
        if self.settings.trie_walk == "continue_final_message":
            return self._walk(requests)
        results = self._ask(requests, self._max_tokens(), self.settings.top_logprobs)
        out: list[Any] = []
        for r, request in enumerate(requests):
            rows, unplaced, failure = [], [], None
            for p in range(len(request.prompts)):
                result = results[(r, p)]
                if not result.ok:
                    failure = self._failure(result)
                    break
                steps = self._steps(result)
                log_probs, bound = top_k_distribution(steps, self.trie, self.names)
                rows.append(log_probs)
                unplaced.append(bound)
            out.append(failure if failure is not None else TopKDistribution(np.stack(rows), np.asarray(unplaced)))
        return out

    def _steps(self, result) -> list[dict[str, Any]]:
        steps = response_logprobs(result.response)
        if steps is None:
            raise LogprobsMissing(
                f"the server at {self.settings.base_url} returned no log-probabilities (choices[0].logprobs "
                "is empty) although logprobs/top_logprobs were asked: it cannot give the expected readout; "
                "use readout=generate or a server that returns them (vllm serve, SGLang, llama.cpp)"
            )
        return steps

    def _walk(self, requests: Sequence[JudgeRequest]) -> list[TopKDistribution | RequestFailure]:
        """The adaptive score trie over HTTP: a round of 1-token requests per trie level, all prompts at once."""
        import torch

        from mlmfilter.clients.chat import ChatRequest
        from mlmfilter.judge.readout import AdaptiveTrieReadout

        trie = self.trie
        rows = [(r, p) for r, request in enumerate(requests) for p in range(len(request.prompts))]
        urls = [decoded_image_url(r.image, self.settings.image_format, self.settings.jpeg_quality) for r in requests]
        readout = AdaptiveTrieReadout(trie, len(rows), self.options.trie_threshold)
        covered = np.ones((len(rows), trie.n_contexts))
        failed: dict[int, RequestFailure] = {}
        wanted = [(i, -1) for i in range(len(rows))]  # -1: the root (the prompt itself)
        while wanted:

            def bodies():
                for i, node in wanted:
                    r, p = rows[i]
                    start = (
                        None
                        if node < 0
                        else self.tokenizer.decode([trie.nodes[n].token_id for n in trie.ancestors(node)])
                    )
                    body = chat_body(
                        self.model,
                        urls[r],
                        requests[r].prompts[p],
                        1,
                        self.settings.top_logprobs,
                        self.settings.token_ids,
                        answer_start=start,
                    )
                    yield ChatRequest(body, tag=(i, node))

            for result in self.client.complete_many(bodies()):
                i, node = result.tag
                if not result.ok:
                    failed.setdefault(i, self._failure(result))
                    continue
                log_continue, tokens, covered[i, node + 1] = step_reductions(self._steps(result)[0], trie, self.names)
                readout.add([i], [node + 1], torch.tensor([0.0]), torch.tensor([log_continue]), torch.tensor([tokens]))
            wanted = [(i, n) for i, nodes in enumerate(readout.to_expand()) if i not in failed for n in nodes]
        log_probs = readout.log_probs().double().numpy()
        unplaced = walk_unplaced(readout, covered)
        out: list[Any] = []
        for r, request in enumerate(requests):
            mine = [i for i, (rr, _) in enumerate(rows) if rr == r]
            failure = next((failed[i] for i in mine if i in failed), None)
            out.append(failure if failure is not None else TopKDistribution(log_probs[mine], unplaced[mine]))
        return out

    def describe(self) -> dict[str, Any]:
        described = describe_settings(self.options)
        if self.warnings:  # "warnings" is the key the run folder collects
            described["warnings"] = list(self.warnings)
        return described

    def readout_provenance(self) -> dict[str, str]:
        return readout_provenance(self.options)

    def stats(self) -> dict[str, Any]:
        return self.client.stats.as_dict()

    def close(self) -> None:
        self.client.close()
        if self.client.cache is not None:
            self.client.cache.close()


def prefill_mismatch(template_owner: Any) -> str | None:
    """How the chat template renders a prefilled answer when that is NOT the generation cue + the answer
    (then a continued answer is another prompt than the one scored); None when they agree."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate it."}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "42"}]}]
    cue = template_owner.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    filled = template_owner.apply_chat_template(
        turn + answer, add_generation_prompt=False, continue_final_message=True, tokenize=False
    )
    return (
        None
        if filled == cue + "42"
        else f"cue + answer ends {(cue + '42')[-24:]!r}, the prefilled answer {filled[-24:]!r}"
    )


def _check_prefill(name: str) -> str | None:
    """Refuses the trie walk when the judge's own chat template (here, as the server has it) would
    continue a different prompt; a warning when no template is available here to check."""
    from transformers import AutoProcessor

    from mlmfilter.models.common import safe_pretrained_kwargs

    try:
        owner = AutoProcessor.from_pretrained(name, **safe_pretrained_kwargs())
    except (OSError, ValueError, ImportError):
        owner = None
    if owner is None or not getattr(owner, "chat_template", None):
        return "trie_walk=continue_final_message: no chat template here to check that a prefilled answer renders as cue + answer"
    mismatch = prefill_mismatch(owner)
    if mismatch is not None:
        raise ValueError(
            "trie_walk=continue_final_message would score another prompt: this model's chat template renders a "
            f"prefilled answer differently from the generation cue followed by it ({mismatch}); use trie_walk=greedy"
        )
    return None


def build_openai_backend(options: Any, settings: OpenAIOptions) -> OpenAIJudgeBackend:
    from mlmfilter.clients.cache import RequestCache
    from mlmfilter.clients.chat import ChatClient

    refuse_unservable(options.conversation, options.answer_prefix)
    client_options = settings.client_options()
    try:
        import openai  # noqa: F401  (the shared client's HTTP layer)
    except ImportError as exc:
        raise ImportError("--backend openai needs the openai package: pip install 'mlmfilter[openai]'") from exc
    tokenizer = _tokenizer(settings.tokenizer or options.model) if options.readout == "expected" else None
    warning = None
    if options.readout == "expected" and settings.trie_walk == "continue_final_message":
        warning = _check_prefill(settings.tokenizer or options.model)
    cache = RequestCache(settings.cache) if settings.cache else None
    client = ChatClient(client_options, cache=cache)
    try:  # a wrong address or a missing key fails here in seconds, not after every request's retries
        client.check_endpoint(settings.served_model or options.model)
    except BaseException:
        client.close()
        raise
    backend = OpenAIJudgeBackend(options, settings, client, tokenizer)
    backend.warnings = [warning] if warning else []
    return backend


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from mlmfilter.models.common import safe_pretrained_kwargs

    try:
        return AutoTokenizer.from_pretrained(name, **safe_pretrained_kwargs())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"the expected readout over HTTP needs the judge's tokenizer here, to know which tokens spell 0..100; "
            f"{name!r} cannot be loaded ({str(exc).splitlines()[0]}). Set backend option tokenizer=PATH_OR_HUB_ID, "
            "or use readout=generate"
        ) from exc


# -- the description ----------------------------------------------------------------------------------


class OpenAIBackendInfo(BackendInfo):
    name = "openai"
    Options = OpenAIOptions
    distribution = "top_k"  # top-k log-probabilities: the scorer adds <metric>_unplaced, the row's bound
    runs_in_process = False  # the model runs on the server; its name is the server's, not a local path

    def check(self, options: Any) -> None:
        refuse_unservable(options.conversation, options.answer_prefix)

    def image_size(self, options: Any) -> int:
        return self.settings(options).image_size

    def describe_settings(self, options: Any) -> dict[str, Any]:
        return describe_settings(options)

    def readout_provenance(self, options: Any) -> dict[str, str]:
        return readout_provenance(options)

    def build(self, options: Any, released: Any = None) -> OpenAIJudgeBackend:
        return build_openai_backend(options, self.settings(options))


INFO = OpenAIBackendInfo()
