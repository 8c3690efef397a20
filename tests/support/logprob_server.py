"""A loopback OpenAI-compatible chat server backed by a real (tiny) transformers VLM, answering with
log-probabilities in vLLM's OpenAI response format, for the judge's ``--backend openai`` expected readout.

It does what ``vllm serve`` does for one request, written independently of mlmfilter's backends: the
image data URL is decoded, the turn is rendered with the model's own chat template (generation cue on),
the processor expands the image, and greedy decoding runs with a plain full forward per step (no KV
cache, no tree masks). ``choices[0].logprobs.content`` holds per step the chosen token, its log-prob
and ``top_logprobs`` entries; with ``return_tokens_as_token_ids`` tokens are named ``token_id:N`` (vLLM's
option), else by their decoded text; ``continue_final_message`` continues a prefilled assistant answer
(vLLM's extension). ``logprobs=False`` makes it a server that never returns any.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler

import torch

from tests.support.fault_server import LoopbackChatServer, _send


class LogprobServer(LoopbackChatServer):
    def __init__(self, model_dir: str, logprobs: bool = True):
        from PIL import Image  # noqa: F401  (fail early if Pillow is missing)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.logprobs = logprobs
        self.requests = 0
        self._lock = threading.Lock()  # one forward at a time (the 2-core CI machine)
        super().__init__()

    def _answer(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        try:
            payload = self.answer(body)
        except Exception as exc:  # noqa: BLE001 - an HTTP 400 like a real server's
            return _send(handler, 400, {"error": {"message": f"{type(exc).__name__}: {exc}"}})
        _send(handler, 200, payload)

    def answer(self, body: dict) -> dict:
        from PIL import Image

        message, *answer = body["messages"]
        image_part = next(p for p in message["content"] if p["type"] == "image_url")
        text_part = next(p for p in message["content"] if p["type"] == "text")
        image = Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1]))).convert("RGB")
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text_part["text"]}]}]
        if body.get("continue_final_message"):  # vLLM's prefill: the assistant's answer so far, continued
            turn.append({"role": "assistant", "content": [{"type": "text", "text": answer[0]["content"]}]})
            prompt = self.processor.apply_chat_template(
                turn, add_generation_prompt=False, continue_final_message=True, tokenize=False
            )
        else:
            prompt = self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=prompt, images=[image], return_tensors="pt")
        want = self.logprobs and bool(body.get("logprobs"))
        k = int(body.get("top_logprobs") or 0)
        by_id = bool(body.get("return_tokens_as_token_ids"))
        name = (lambda t: f"token_id:{t}") if by_id else (lambda t: self.tokenizer.decode([t]))
        ids = inputs["input_ids"]
        extra = {key: v for key, v in inputs.items() if key not in ("input_ids", "attention_mask")}
        generated, steps = [], []
        with self._lock, torch.inference_mode():
            self.requests += 1
            for _ in range(int(body.get("max_tokens") or 16)):
                logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                chosen = int(logp.argmax())
                top_lp, top_ids = logp.topk(min(k, logp.shape[0])) if k else (logp[:0], logp[:0].long())
                steps.append(
                    {
                        "token": name(chosen),
                        "logprob": float(logp[chosen]),
                        "bytes": list(name(chosen).encode()),
                        "top_logprobs": [
                            {"token": name(int(t)), "logprob": float(v), "bytes": list(name(int(t)).encode())}
                            for v, t in zip(top_lp.tolist(), top_ids.tolist())
                        ],
                    }
                )
                if chosen == self.tokenizer.eos_token_id:
                    break
                generated.append(chosen)
                ids = torch.cat([ids, torch.tensor([[chosen]])], dim=1)
        return {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": self.tokenizer.decode(generated, skip_special_tokens=True),
                    },
                    "logprobs": {"content": steps} if want else None,
                    "finish_reason": "stop" if len(steps) > len(generated) else "length",
                }
            ],
            "usage": {
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "completion_tokens": len(steps),
                "total_tokens": int(inputs["input_ids"].shape[1]) + len(steps),
            },
        }
