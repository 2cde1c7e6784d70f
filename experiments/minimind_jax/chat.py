"""MiniMind's chat format: ChatML rendering and supervised fine-tuning (SFT) encoding.

MiniMind's SFT records look like::

    {"conversations": [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am MiniLoRA."},
    ]}

and each message is rendered in ChatML as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.
:func:`encode_sft` turns one record into fixed-length token ids plus a loss mask that is 1 on
the assistant's answers only.

Mask convention (used by every function here): ``loss_mask[t]`` says whether the token *at*
position ``t`` is a training target. A next-token loss therefore pairs predictions made at
``t - 1`` with targets at ``t``::

    logits = model(input_ids)                  # [batch, len, vocab]
    per_token = cross_entropy(logits[:, :-1], input_ids[:, 1:])
    loss = (per_token * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "IM_END",
    "IM_START",
    "MINIMIND_DEFAULT_SYSTEM",
    "PAD_ID",
    "encode_prompt",
    "encode_sft",
    "encode_sft_records",
    "load_tokenizer",
    "render_chatml",
    "sft_batches",
]

PAD_ID = 0  # <|endoftext|>, also MiniMind's unk token
BOS_ID = 1  # <|im_start|>
EOS_ID = 2  # <|im_end|>
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_SPECIAL_STRINGS = ("<|endoftext|>", IM_START, IM_END)
_ROLES = ("system", "user", "assistant")

#: The system message MiniMind's own chat template inserts when a conversation has none.
MINIMIND_DEFAULT_SYSTEM = "You are a helpful assistant"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a Hugging Face ``tokenizer.json`` file.

    Args:
      path: path to ``tokenizer.json`` (for MiniMind2, the byte-level BPE with 6,400 tokens in
        ``experiments/data/minimind2-tokenizer/``).

    Returns:
      The ``tokenizers.Tokenizer``.

    Raises:
      FileNotFoundError: if ``path`` is not a file.

    Example:
      >>> tok = load_tokenizer("experiments/data/minimind2-tokenizer/tokenizer.json")
      >>> tok.token_to_id("<|im_end|>")
      2
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (expected a tokenizer.json)")
    return Tokenizer.from_file(str(path))


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {messages!r}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(
                f"message {i} must be a dict with 'role' and 'content', got {message!r}"
            )
        role, content = message["role"], message["content"]
        if role not in _ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {_ROLES}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")
        if not isinstance(content, str):
            raise TypeError(f"message {i} ({role}) content must be a str, got {type(content)}")
        for special in _SPECIAL_STRINGS:
            if special in content:
                raise ValueError(
                    f"message {i} ({role}) content contains the special token {special!r}; "
                    "it would be read as a control token, remove it from the text"
                )


def _pieces(
    messages: Sequence[Mapping[str, str]],
    system_prompt: str | None,
    add_generation_prompt: bool,
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_target) pieces; joined they are the ChatML text.

    The pieces are cut exactly where the loss mask changes, so encoding them one by one gives
    token boundaries at those places whatever the BPE would merge.
    """
    _check_messages(messages)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    pieces: list[tuple[str, bool]] = []
    for message in messages:
        is_answer = message["role"] == "assistant"
        pieces.append((f"{IM_START}{message['role']}\n", False))
        if message["content"]:
            pieces.append((message["content"], is_answer))
        pieces.append((IM_END, is_answer))
        pieces.append(("\n", False))
    if add_generation_prompt:
        pieces.append((f"{IM_START}assistant\n", False))
    return pieces


def render_chatml(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    system_prompt: str | None = None,
) -> str:
    """Renders messages as ChatML text.

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; with
    ``add_generation_prompt`` the text ends in ``<|im_start|>assistant\\n`` so a model continues
    with the answer.

    Difference from MiniMind's template (``tokenizer_config.json``): when the conversation does
    not start with a system message, MiniMind's Jinja template inserts
    ``<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n``. Here no system message is
    added unless asked for: pass ``system_prompt=MINIMIND_DEFAULT_SYSTEM`` to reproduce the
    template exactly. The tool-calling branches of the template are not supported.

    Args:
      messages: ``[{"role": ..., "content": ...}, ...]`` with roles ``"user"``/``"assistant"``
        and optionally a leading ``"system"``.
      add_generation_prompt: append the assistant header for generation.
      system_prompt: a system message to put first if ``messages`` has none.

    Returns:
      The ChatML string.

    Raises:
      ValueError, TypeError: for an unknown role, a system message that is not first, non-string
        content, or content containing a special token string.

    Example:
      >>> render_chatml([{"role": "user", "content": "hi"}], add_generation_prompt=True)
      '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    return "".join(text for text, _ in _pieces(messages, system_prompt, add_generation_prompt))


def _encode_pieces(
    pieces: Sequence[tuple[str, bool]], tokenizer: Tokenizer
) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    mask: list[float] = []
    for text, is_target in pieces:
        piece_ids = tokenizer.encode(text, add_special_tokens=False).ids
        ids.extend(piece_ids)
        mask.extend([float(is_target)] * len(piece_ids))
    return ids, mask


def _conversation(record: Mapping[str, Sequence[Mapping[str, str]]]) -> Sequence:
    if not isinstance(record, Mapping) or "conversations" not in record:
        raise ValueError(
            f"an SFT record must be a dict with a 'conversations' list, got {record!r:.200}"
        )
    return record["conversations"]


def encode_sft(
    conversation: Mapping[str, Sequence[Mapping[str, str]]],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    system_prompt: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes one SFT record and marks the assistant's answers as targets.

    The loss mask is 1 from the first token after ``<|im_start|>assistant\\n`` through the closing
    ``<|im_end|>`` of every assistant message, so the model learns to answer and to stop; it is 0
    on system and user turns, on role headers, on the ``\\n`` after each ``<|im_end|>`` and on
    padding. (MiniMind's own ``SFTDataset`` also marks that trailing ``\\n``; it is never
    generated, since decoding stops at ``<|im_end|>``, so it is left out here.)

    The text is tokenized piece by piece (header, content, ``<|im_end|>``, ``\\n``) and the ids are
    concatenated, so no BPE merge can cross a mask boundary. For ordinary content this gives the
    same ids as tokenizing :func:`render_chatml`'s output in one go.

    Sequences longer than ``max_len`` are cut at the end (a cut answer keeps its mask up to the
    cut); shorter ones are right-padded with :data:`PAD_ID` and mask 0.

    See the module docstring for how the mask lines up with next-token targets.

    Args:
      conversation: a record ``{"conversations": [{"role": ..., "content": ...}, ...]}``.
      tokenizer: the MiniMind2 tokenizer (see :func:`load_tokenizer`).
      max_len: length of the returned arrays.
      system_prompt: as in :func:`render_chatml`.

    Returns:
      ``(input_ids, loss_mask)``: ``int32[max_len]`` and ``float32[max_len]``.

    Example:
      >>> tok = load_tokenizer("experiments/data/minimind2-tokenizer/tokenizer.json")
      >>> record = {"conversations": [{"role": "user", "content": "hi"},
      ...                             {"role": "assistant", "content": "hello"}]}
      >>> ids, mask = encode_sft(record, tok, max_len=16)
      >>> tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
      'hello<|im_end|>'
    """
    if not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    messages = _conversation(conversation)
    ids, mask = _encode_pieces(_pieces(messages, system_prompt, False), tokenizer)
    ids, mask = ids[:max_len], mask[:max_len]
    input_ids = np.full((max_len,), PAD_ID, dtype=np.int32)
    loss_mask = np.zeros((max_len,), dtype=np.float32)
    input_ids[: len(ids)] = ids
    loss_mask[: len(mask)] = mask
    return input_ids, loss_mask


def encode_prompt(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    *,
    system_prompt: str | None = None,
) -> np.ndarray:
    """Token ids of a conversation followed by ``<|im_start|>assistant\\n``, ready to generate.

    Tokenized the same way as :func:`encode_sft`, so a prompt seen at inference matches the
    prompts seen in training token for token.

    Args:
      messages: as in :func:`render_chatml`.
      tokenizer: the MiniMind2 tokenizer.
      system_prompt: as in :func:`render_chatml`.

    Returns:
      ``int32[n]`` ids, unpadded.

    Example:
      >>> tok = load_tokenizer("experiments/data/minimind2-tokenizer/tokenizer.json")
      >>> ids = encode_prompt([{"role": "user", "content": "Who are you?"}], tok)
      >>> tok.decode(ids.tolist(), skip_special_tokens=False)[-22:]
      '<|im_start|>assistant\\n'
    """
    ids, _ = _encode_pieces(_pieces(messages, system_prompt, True), tokenizer)
    return np.asarray(ids, dtype=np.int32)


def encode_sft_records(
    records: Sequence[Mapping[str, Sequence[Mapping[str, str]]]],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    system_prompt: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes many SFT records with :func:`encode_sft` and stacks them.

    Args:
      records: SFT records (``{"conversations": [...]}``).
      tokenizer: the MiniMind2 tokenizer.
      max_len: length of every row.
      system_prompt: as in :func:`render_chatml`.

    Returns:
      ``(input_ids, loss_mask)``: ``int32[n, max_len]`` and ``float32[n, max_len]``.

    Raises:
      ValueError: if ``records`` is empty, or a record has no assistant token left after
        truncation (it would contribute nothing to the loss; raise ``max_len``).

    Example:
      >>> tok = load_tokenizer("experiments/data/minimind2-tokenizer/tokenizer.json")
      >>> record = {"conversations": [{"role": "user", "content": "hi"},
      ...                             {"role": "assistant", "content": "hello"}]}
      >>> ids, mask = encode_sft_records([record, record], tok, max_len=32)
      >>> ids.shape, mask.shape
      ((2, 32), (2, 32))
    """
    if len(records) == 0:
        raise ValueError("records is empty: nothing to encode")
    encoded = [encode_sft(r, tokenizer, max_len, system_prompt=system_prompt) for r in records]
    input_ids = np.stack([ids for ids, _ in encoded])
    loss_mask = np.stack([mask for _, mask in encoded])
    empty = np.flatnonzero(loss_mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"records {empty[:10].tolist()} have no assistant tokens within max_len={max_len}; "
            "raise max_len or drop them"
        )
    return input_ids, loss_mask


def sft_batches(
    input_ids: np.ndarray,
    loss_mask: np.ndarray,
    batch_size: int,
    *,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless, deterministic, shuffled batches over encoded SFT rows.

    Rows are drawn epoch by epoch, each epoch a fresh permutation; epochs are chained so every
    batch is full and every row is used equally often.

    Args:
      input_ids: ``int32[n, len]`` from :func:`encode_sft_records`.
      loss_mask: ``float32[n, len]``, same shape.
      batch_size: rows per batch.
      seed: seed of the shuffle; the same seed gives the same stream.

    Yields:
      ``(input_ids, loss_mask)`` of shape ``[batch_size, len]``.

    Example:
      >>> ids, mask = np.zeros((5, 8), np.int32), np.ones((5, 8), np.float32)
      >>> batch_ids, batch_mask = next(sft_batches(ids, mask, batch_size=2, seed=0))
      >>> batch_ids.shape
      (2, 8)
    """
    if input_ids.ndim != 2 or input_ids.shape != loss_mask.shape:
        raise ValueError(
            "input_ids and loss_mask must both be [n, len] with the same shape, got "
            f"{input_ids.shape} and {loss_mask.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = input_ids.shape[0]
    if n == 0:
        raise ValueError(f"no rows to batch: input_ids has shape {input_ids.shape}")
    rng = np.random.default_rng(seed)
    queue = np.empty((0,), dtype=np.int64)
    while True:
        while queue.size < batch_size:
            queue = np.concatenate([queue, rng.permutation(n)])
        take, queue = queue[:batch_size], queue[batch_size:]
        yield input_ids[take], loss_mask[take]
