"""Prompt tokenization on the gateway: completion prompts, chat templates and token texts.

The gateway tokenizes so that it can check lengths before anything reaches
Redis. Hugging Face fast tokenizers may fail with "Already borrowed" when one
instance is used from several threads at once, so all encoding runs on one
worker thread, which also keeps long prompts off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from services.gateway.errors import InvalidRequest
from services.gateway.schemas import ChatMessage

logger = logging.getLogger("saguaro.gateway")


def load_tokenizer(model_dir: str) -> Any:
    """Load the tokenizer of the target model directory (never the model weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class PromptProcessor:
    """Turns completion prompts and chat messages into token ids and renders token texts."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saguaro-tokenizer")
        self.token_text = lru_cache(maxsize=65536)(self._decode_one)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, function, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    async def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Return the token ids of a completion prompt. A prompt given as token ids is checked against the vocabulary."""
        if isinstance(prompt, list):
            self.check_token_ids(prompt, "prompt")
            return list(prompt)
        token_ids = await self._run(self._encode, prompt, True)
        if not token_ids:
            raise InvalidRequest("prompt is empty after tokenization; send a non-empty prompt", param="prompt")
        return token_ids

    async def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        """Render the messages with the model's chat template plus the generation prompt and tokenize them."""
        if not self.has_chat_template:
            raise InvalidRequest(
                "the served model's tokenizer has no chat template; use /v1/completions with a formatted prompt",
                param="messages",
            )
        conversation = [{"role": message.role, "content": message.text()} for message in messages]
        for message, entry in zip(messages, conversation):
            if message.name is not None:
                entry["name"] = message.name
        try:
            text = await self._run(self._render_chat, conversation)
        except Exception as exc:  # jinja2 raises TemplateError and custom exceptions from raise_exception()
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc
        # The template already contains any BOS token, so no special tokens are added here.
        token_ids = await self._run(self._encode, text, False)
        if not token_ids:
            raise InvalidRequest("messages are empty after applying the chat template", param="messages")
        return token_ids

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        for position, token_id in enumerate(token_ids):
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequest(
                    f"{param}[{position}] = {token_id} is not a valid token id; ids must be in [0, {self.vocab_size})",
                    param=param,
                )

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _render_chat(self, conversation: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
