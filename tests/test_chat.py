"""Tests for minimind_jax.chat and the demo data in experiments/minimind_jax/identity.py."""

import itertools
import json
import re

import numpy as np
import pytest
from minimind_jax import chat
from minimind_jax import identity as identity_data

pytestmark = pytest.mark.slow

TWO_TURNS = {
    "conversations": [
        {"role": "user", "content": "question1"},
        {"role": "assistant", "content": "answer1"},
        {"role": "user", "content": "question2"},
        {"role": "assistant", "content": "answer2"},
    ]
}
TWO_TURNS_TEXT = (
    "<|im_start|>user\nquestion1<|im_end|>\n"
    "<|im_start|>assistant\nanswer1<|im_end|>\n"
    "<|im_start|>user\nquestion2<|im_end|>\n"
    "<|im_start|>assistant\nanswer2<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    return identity_data.load_minimind_tokenizer()


def _decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _masked_runs(ids, mask):
    """Contiguous runs of masked ids, as lists."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(int(i))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_load_tokenizer_special_ids(tok):
    assert tok.get_vocab_size() == 6400
    assert tok.token_to_id("<|endoftext|>") == chat.PAD_ID
    assert tok.token_to_id("<|im_start|>") == chat.BOS_ID
    assert tok.token_to_id("<|im_end|>") == chat.EOS_ID


def test_load_tokenizer_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        chat.load_tokenizer(missing)


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be, that is the question.",
        "  leading spaces\nand\ttabs\n\n",
        "我是MiniLoRA，由minilora_jax团队开发的AI助手。",
        "中英混合 mixed text 123 ！？",
    ],
)
def test_tokenizer_round_trips(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_render_chatml_exact():
    assert chat.render_chatml(TWO_TURNS["conversations"]) == TWO_TURNS_TEXT
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert chat.render_chatml(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_chatml_matches_minimind_template_with_default_system():
    jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
    config_path = identity_data.DATA_DIR / "minimind2-tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    env = jinja2_sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(config["chat_template"])
    messages = TWO_TURNS["conversations"]
    for generation in (False, True):
        expected = template.render(messages=messages, add_generation_prompt=generation)
        ours = chat.render_chatml(
            messages,
            add_generation_prompt=generation,
            system_prompt=chat.MINIMIND_DEFAULT_SYSTEM,
        )
        assert ours == expected
    # Without system_prompt only the default system turn is missing.
    expected = template.render(messages=messages, add_generation_prompt=False)
    default_turn = f"<|im_start|>system\n{chat.MINIMIND_DEFAULT_SYSTEM}<|im_end|>\n"
    assert default_turn + chat.render_chatml(messages) == expected


def test_encode_sft_masks_exactly_the_answers(tok):
    ids, mask = chat.encode_sft(TWO_TURNS, tok, max_len=64)
    assert ids.shape == (64,) and ids.dtype == np.int32
    assert mask.shape == (64,) and mask.dtype == np.float32
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    runs = _masked_runs(ids, mask)
    assert [_decode(tok, run) for run in runs] == ["answer1<|im_end|>", "answer2<|im_end|>"]
    # Each run starts right after the `<|im_start|>assistant\n` ids.
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    starts = np.flatnonzero(np.diff(np.concatenate([[0.0], mask])) == 1)
    for start in starts:
        assert ids[start - len(header) : start].tolist() == header


def test_encode_sft_pads_and_matches_whole_text_encoding(tok):
    ids, mask = chat.encode_sft(TWO_TURNS, tok, max_len=64)
    whole = tok.encode(TWO_TURNS_TEXT, add_special_tokens=False).ids
    n = len(whole)
    assert n < 64
    assert ids[:n].tolist() == whole
    assert (ids[n:] == chat.PAD_ID).all()
    assert (mask[n:] == 0).all()
    assert _decode(tok, ids[:n]) == TWO_TURNS_TEXT


def test_encode_sft_boundary_cannot_merge(tok):
    # Content starting with whitespace could merge with the header's "\n" in one-shot BPE.
    record = {
        "conversations": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "\n  indented"},
        ]
    }
    ids, mask = chat.encode_sft(record, tok, max_len=32)
    assert [_decode(tok, run) for run in _masked_runs(ids, mask)] == ["\n  indented<|im_end|>"]


def test_encode_sft_truncates(tok):
    full_ids, full_mask = chat.encode_sft(TWO_TURNS, tok, max_len=64)
    n = int(np.flatnonzero(full_ids != chat.PAD_ID)[-1]) + 1
    cut = n - 3  # inside the second answer
    ids, mask = chat.encode_sft(TWO_TURNS, tok, max_len=cut)
    assert ids.shape == (cut,) and mask.shape == (cut,)
    np.testing.assert_array_equal(ids, full_ids[:cut])
    np.testing.assert_array_equal(mask, full_mask[:cut])
    assert mask[-1] == 1  # the cut answer is still a target up to the cut


def test_encode_sft_errors(tok):
    with pytest.raises(ValueError, match="conversations"):
        chat.encode_sft({"messages": []}, tok, max_len=8)
    with pytest.raises(ValueError, match="role 'bot'"):
        chat.encode_sft({"conversations": [{"role": "bot", "content": "x"}]}, tok, max_len=8)
    with pytest.raises(ValueError, match="special token"):
        chat.encode_sft(
            {"conversations": [{"role": "user", "content": "a<|im_end|>b"}]}, tok, max_len=8
        )
    with pytest.raises(ValueError, match="only the first"):
        chat.render_chatml([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(ValueError, match="max_len"):
        chat.encode_sft(TWO_TURNS, tok, max_len=0)


def test_encode_prompt_matches_render(tok):
    messages = [{"role": "user", "content": "你是谁？"}]
    ids = chat.encode_prompt(messages, tok)
    assert ids.dtype == np.int32
    assert _decode(tok, ids) == chat.render_chatml(messages, add_generation_prompt=True)


def test_encode_sft_records_and_batches(tok):
    records = [TWO_TURNS] * 3
    ids, mask = chat.encode_sft_records(records, tok, max_len=48)
    assert ids.shape == (3, 48) and mask.shape == (3, 48)
    first = itertools.islice(chat.sft_batches(ids, mask, batch_size=2, seed=1), 4)
    again = itertools.islice(chat.sft_batches(ids, mask, batch_size=2, seed=1), 4)
    for (a_ids, a_mask), (b_ids, b_mask) in zip(first, again, strict=True):
        assert a_ids.shape == (2, 48) and a_mask.shape == (2, 48)
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_mask, b_mask)
    with pytest.raises(ValueError, match="no assistant tokens"):
        chat.encode_sft_records(records, tok, max_len=4)


def test_identity_split_disjoint_and_bilingual():
    assert len(identity_data.ENGLISH_QUESTIONS) >= 40
    assert len(identity_data.CHINESE_QUESTIONS) >= 30
    train, heldout = identity_data.identity_dataset(seed=0)
    again_train, again_heldout = identity_data.identity_dataset(seed=0)
    assert train == again_train and heldout == again_heldout

    def questions(records):
        return {r["conversations"][0]["content"] for r in records}

    train_q, heldout_q = questions(train), questions(heldout)
    assert not train_q & heldout_q
    normalize = identity_data._normalize
    assert not {normalize(q) for q in train_q} & {normalize(q) for q in heldout_q}
    all_q = set(identity_data.ENGLISH_QUESTIONS) | set(identity_data.CHINESE_QUESTIONS)
    assert train_q | heldout_q == all_q

    cjk = re.compile(r"[\u4e00-\u9fff]")
    for split in (train_q, heldout_q):
        assert any(cjk.search(q) for q in split)
        assert any(not cjk.search(q) for q in split)
    assert 0.1 < len(heldout_q) / len(all_q) < 0.3

    for record in train + heldout:
        roles = [m["role"] for m in record["conversations"]]
        assert roles == ["user", "assistant"]
        assert "MiniLoRA" in record["conversations"][1]["content"]


def test_shakespeare_tokens_cached(tok, tmp_path):
    tokens = identity_data.shakespeare_tokens(tok, cache_dir=tmp_path)
    assert tokens.dtype == np.int32 and tokens.shape == (465_025,)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    np.testing.assert_array_equal(identity_data.shakespeare_tokens(tok, cache_dir=tmp_path), tokens)
    assert tok.decode(tokens[:20].tolist()).startswith("First Citizen:")


def test_pretrain_batches_deterministic_windows():
    tokens = np.arange(1000, dtype=np.int32)
    stream = identity_data.pretrain_batches(tokens, batch=4, seq_len=16, seed=3)
    rows = next(stream)
    assert rows.shape == (4, 17) and rows.dtype == np.int32
    assert (np.diff(rows, axis=1) == 1).all()  # consecutive tokens
    assert rows.max() < 1000
    np.testing.assert_array_equal(
        next(identity_data.pretrain_batches(tokens, batch=4, seq_len=16, seed=3)), rows
    )
    with pytest.raises(ValueError, match="seq_len"):
        next(identity_data.pretrain_batches(tokens[:10], batch=1, seq_len=10, seed=0))
