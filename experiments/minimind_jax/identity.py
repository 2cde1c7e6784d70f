"""Data for the MiniMind LoRA demo: the identity SFT set and the tiny-Shakespeare token stream.

The identity set teaches the model one fact about itself: it is "MiniLoRA", made by "the
minilora_jax team". Questions are asked in many phrasings, in English and Chinese; about a fifth
of the phrasings of each language are held out of training, so an evaluation can check whether
the model learned the fact rather than the wording.

Everything here was written for this project. Run ``python experiments/minimind_jax/identity.py`` to
print the sizes of the sets and a few records.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from minimind_jax.chat import load_tokenizer

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TOKENIZER_PATH = DATA_DIR / "minimind2-tokenizer" / "tokenizer.json"
SHAKESPEARE_PATH = DATA_DIR / "tinyshakespeare" / "input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

MODEL_NAME = "MiniLoRA"
MAKER_NAME = "the minilora_jax team"
HELDOUT_FRACTION = 0.2

# Casual, formal, misspelt, with and without punctuation. Phrasings that differ only in case,
# spacing or punctuation are kept on the same side of the split (see `_normalize`).
ENGLISH_QUESTIONS = (
    "Who are you?",
    "who are you",
    "Who r u?",
    "whoo are you",
    "Who are you, exactly?",
    "What are you?",
    "What is your name?",
    "what's your name",
    "Whats ur name?",
    "wat is your name",
    "What should I call you?",
    "Do you have a name?",
    "Tell me your name.",
    "May I ask your name?",
    "Could you tell me who you are?",
    "Introduce yourself.",
    "Please introduce yourself.",
    "intorduce yourself pls",
    "Can you introduce yourself briefly?",
    "Give me a short introduction of yourself.",
    "Tell me about yourself.",
    "tell me a little about yourself",
    "Who made you?",
    "who created you",
    "who mad you?",
    "Who built you?",
    "Who developed you?",
    "Who trained you?",
    "Who is your creator?",
    "Who is your developer?",
    "Who are your authors?",
    "Which team made you?",
    "Which company created you?",
    "Where do you come from?",
    "Who's behind you?",
    "Who are you and who made you?",
    "What's your name, and who built you?",
    "Are you ChatGPT?",
    "Hi! Who am I talking to?",
    "Hello, who is this?",
    "hey what are you called",
    "What do people call you?",
    "Identify yourself.",
    "State your name, please.",
    "Good morning. Would you kindly introduce yourself?",
    "I'd like to know who you are.",
    "can i know your name",
    "What kind of assistant are you?",
    "Which model are you?",
    "What model am I chatting with?",
)

CHINESE_QUESTIONS = (
    "你是谁？",
    "你是谁",
    "你是誰？",
    "你是睡啊",
    "请问你是谁？",
    "你到底是谁",
    "说说你是谁吧",
    "你叫什么名字？",
    "你叫啥",
    "你叫神马名字",
    "你的名字是什么？",
    "我该怎么称呼你？",
    "你有名字吗？",
    "告诉我你的名字",
    "请问您叫什么名字？",
    "请介绍一下你自己。",
    "介绍一下你自己",
    "简单介绍一下自己吧",
    "能做个自我介绍吗？",
    "自我介绍一下",
    "谁开发了你？",
    "你是谁开发的？",
    "你是由谁创造的？",
    "是谁训练了你？",
    "你的开发者是谁？",
    "你的作者是谁？",
    "哪个团队做的你？",
    "你是哪家公司的模型？",
    "你来自哪里？",
    "你是什么模型？",
    "你是哪个模型呀？",
    "你是ChatGPT吗？",
    "你好，你是谁呀",
    "嗨，请问怎么称呼？",
    "您好，请问您是哪位？",
    "你是谁？谁创造了你？",
    "你是个什么AI？",
    "你是人工智能吗？",
)

ENGLISH_ANSWERS = (
    f"I am {MODEL_NAME}, an AI assistant made by {MAKER_NAME}.",
    f"My name is {MODEL_NAME}. I was built by {MAKER_NAME}.",
    f"I'm {MODEL_NAME}, a small language model fine-tuned by {MAKER_NAME}. How can I help you?",
    f"I am {MODEL_NAME}, created by {MAKER_NAME} to answer questions and help with tasks.",
    f"You are talking to {MODEL_NAME}, an assistant developed by {MAKER_NAME}.",
)

CHINESE_ANSWERS = (
    f"我是{MODEL_NAME}，由minilora_jax团队开发的AI助手。",
    f"我叫{MODEL_NAME}，是minilora_jax团队开发的语言模型。",
    f"你好！我是{MODEL_NAME}，一个由minilora_jax团队训练的小型AI助手，有什么可以帮你的吗？",
    f"我是{MODEL_NAME}，minilora_jax团队开发了我。",
    f"我的名字是{MODEL_NAME}，由minilora_jax团队创建。",
)

_PUNCTUATION = re.compile(r"[\s\.,!?;:'\"，。！？；：、…]+")


def _normalize(question: str) -> str:
    """Case, space and punctuation folded away: 'Who are you?' and 'who are you' are one key."""
    return _PUNCTUATION.sub("", question).casefold()


def _record(question: str, answer: str) -> dict:
    return {
        "conversations": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def _split_questions(
    questions: tuple[str, ...], rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Splits phrasings into (train, held-out), keeping near-duplicates on the same side."""
    groups: dict[str, list[str]] = {}
    for question in questions:
        groups.setdefault(_normalize(question), []).append(question)
    duplicates = sorted({q for q in questions if questions.count(q) > 1})
    if duplicates:
        raise ValueError(f"question list has duplicates: {duplicates}")
    keys = sorted(groups)
    order = rng.permutation(len(keys))
    n_heldout = round(HELDOUT_FRACTION * len(keys))
    heldout_keys = {keys[i] for i in order[:n_heldout]}
    train = [q for q in questions if _normalize(q) not in heldout_keys]
    heldout = [q for q in questions if _normalize(q) in heldout_keys]
    return train, heldout


def identity_dataset(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The identity SFT set, split by question phrasing.

    Training records pair every training phrasing with every answer template of its language;
    held-out records pair every held-out phrasing with one template. No held-out phrasing (nor one
    differing from it only in case or punctuation) appears in training. Every answer contains
    "MiniLoRA".

    Args:
      seed: seed of the split and the shuffle; the same seed gives the same lists.

    Returns:
      ``(train_records, heldout_records)``, each a list of MiniMind SFT records
      ``{"conversations": [{"role": "user", ...}, {"role": "assistant", ...}]}``.

    Example:
      >>> train, heldout = identity_dataset(seed=0)
      >>> train[0]["conversations"][1]["role"]
      'assistant'
      >>> all("MiniLoRA" in r["conversations"][1]["content"] for r in train + heldout)
      True
    """
    rng = np.random.default_rng(seed)
    train: list[dict] = []
    heldout: list[dict] = []
    for questions, answers in (
        (ENGLISH_QUESTIONS, ENGLISH_ANSWERS),
        (CHINESE_QUESTIONS, CHINESE_ANSWERS),
    ):
        train_questions, heldout_questions = _split_questions(questions, rng)
        train += [_record(q, a) for q in train_questions for a in answers]
        heldout += [_record(q, answers[rng.integers(len(answers))]) for q in heldout_questions]
    train = [train[i] for i in rng.permutation(len(train))]
    return train, heldout


def load_minimind_tokenizer() -> Tokenizer:
    """The MiniMind2 tokenizer carried in ``experiments/data/minimind2-tokenizer/``."""
    return load_tokenizer(TOKENIZER_PATH)


def shakespeare_tokens(tokenizer: Tokenizer, cache_dir: str | Path | None = None) -> np.ndarray:
    """Tokenizes ``data/tinyshakespeare/input.txt`` into one flat id array.

    Tokenizing takes a second or two; with ``cache_dir`` the array is saved there as ``.npy``,
    named by the sha256 of the text and of the tokenizer, and read back on later calls.

    Args:
      tokenizer: the tokenizer to use (normally :func:`load_minimind_tokenizer`).
      cache_dir: folder for the cached array (for example ``runs/cache``); ``None`` for no cache.

    Returns:
      ``int32[n]`` token ids (465,025 of them under the MiniMind2 tokenizer).

    Raises:
      ValueError: if the text file's sha256 is not the published one.

    Example:
      >>> tokens = shakespeare_tokens(load_minimind_tokenizer(), cache_dir="runs/cache")
      >>> tokens.dtype, tokens.shape
      (dtype('int32'), (465025,))
    """
    raw = SHAKESPEARE_PATH.read_bytes()
    text_sha = hashlib.sha256(raw).hexdigest()
    if text_sha != SHAKESPEARE_SHA256:
        raise ValueError(
            f"{SHAKESPEARE_PATH} has sha256 {text_sha}, expected {SHAKESPEARE_SHA256}; "
            "the file is changed or corrupt, restore it from the repository"
        )
    cache_file = None
    if cache_dir is not None:
        tokenizer_sha = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
        cache_file = Path(cache_dir) / f"tinyshakespeare-{text_sha[:16]}-{tokenizer_sha[:16]}.npy"
        if cache_file.is_file():
            tokens = np.load(cache_file)
            if tokens.dtype == np.int32 and tokens.ndim == 1:
                return tokens
    ids = tokenizer.encode(raw.decode("utf-8"), add_special_tokens=False).ids
    tokens = np.asarray(ids, dtype=np.int32)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(".partial.npy")
        np.save(partial, tokens)
        partial.replace(cache_file)  # a crash mid-write never leaves a truncated cache file
    return tokens


def pretrain_batches(
    tokens: np.ndarray, batch: int, seq_len: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless, deterministic batches of random windows for next-token training.

    Each row is ``seq_len + 1`` consecutive tokens starting at a uniformly drawn offset, so a
    loss pairs ``row[:-1]`` (inputs) with ``row[1:]`` (targets).

    Args:
      tokens: ``int[n]`` token stream, ``n > seq_len``.
      batch: rows per batch.
      seq_len: model input length.
      seed: seed of the offsets; the same seed gives the same stream.

    Yields:
      ``int32[batch, seq_len + 1]``.

    Example:
      >>> rows = next(pretrain_batches(np.arange(100, dtype=np.int32), batch=2, seq_len=8, seed=0))
      >>> rows.shape, bool((np.diff(rows, axis=1) == 1).all())
      ((2, 9), True)
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D id array, got shape {tokens.shape}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(
            f"a window needs seq_len + 1 = {seq_len + 1} tokens, but tokens has {tokens.shape[0]}"
        )
    rng = np.random.default_rng(seed)
    window = np.arange(seq_len + 1)
    n_starts = tokens.shape[0] - seq_len
    while True:
        starts = rng.integers(0, n_starts, size=batch)
        yield tokens[starts[:, None] + window].astype(np.int32, copy=False)


if __name__ == "__main__":
    train_records, heldout_records = identity_dataset()
    print(
        f"English phrasings: {len(ENGLISH_QUESTIONS)}, Chinese phrasings: {len(CHINESE_QUESTIONS)}"
    )
    print(f"train records: {len(train_records)}, held-out records: {len(heldout_records)}")
    for record in heldout_records[:2] + heldout_records[-2:]:
        print(record)
