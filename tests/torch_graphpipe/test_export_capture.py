"""Models captured the way users write them: Hugging Face BERT and GPT-2 from configs, through
``torch.export`` (see [Note: export capture]), trained on gloo ranks like single-process training;
train-mode differences (dropout, BatchNorm) are warned about (see [Note: train-mode differences])."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from _gp_dist import init_gloo, shared_seed, spawn
from _gp_models import Untraceable

from torch_graphpipe import GraphCaptureError, GraphPipe, capture
from torch_graphpipe.train_mode import mode_dependent_ops, train_mode_differences

transformers = pytest.importorskip("transformers")

RTOL, ATOL = 1e-5, 1e-6
VOCAB, SEQ = 97, 12


def _bert(dropout: float = 0.0) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).train()


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).train()


def _bert_loss(out, y):
    return F.cross_entropy(out.logits, y)


def _gpt2_loss(out, y):
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


MODELS = {  # name -> (build, loss, target of a batch of ids)
    "bert": (_bert, _bert_loss, lambda ids, g: torch.randint(0, 3, (ids.shape[0],), generator=g)),
    "gpt2": (_gpt2, _gpt2_loss, lambda ids, g: torch.randint(0, VOCAB, ids.shape, generator=g)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hugging_face_models_are_captured_by_export(name):
    build, _, _ = MODELS[name]
    model = build()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with pytest.raises(GraphCaptureError, match=r"torch\.fx"):
        capture(model, method="fx")
    captured = capture(model, example_inputs=(ids,))
    assert captured.method == "export"
    other = torch.randint(0, VOCAB, (6, SEQ))  # another batch size: the batch dimension is dynamic
    out, ref = captured.graph_module(other), model(other)
    assert type(out) is type(ref)  # the model's own output structure (ModelOutput)
    torch.testing.assert_close(out.logits, ref.logits)
    assert set(captured.graph_module.state_dict()) >= set(model.state_dict())


def test_untraceable_model_names_the_construct_for_both_captures():
    with pytest.raises(
        GraphCaptureError, match=r"torch\.fx at .*`if x\.sum\(\) > 0:`.*torch\.export.*`if x\.sum\(\) > 0:`"
    ):
        capture(Untraceable(), example_inputs=(torch.randn(2, 4),))
    with pytest.raises(GraphCaptureError, match=r"_gp_models\.py:\d+ `if x\.sum\(\) > 0:`"):
        capture(Untraceable(), example_inputs=(torch.randn(2, 4),), method="export")


def test_gpt2_with_its_cache_says_what_to_do():
    model = _gpt2()
    model.config.use_cache = True
    with pytest.raises(GraphCaptureError, match="use_cache=False"):
        capture(model, example_inputs=(torch.randint(0, VOCAB, (2, SEQ)),), method="export")


def test_train_mode_differences_are_named():
    bert = _bert()
    ids = (torch.randint(0, VOCAB, (2, SEQ)),)
    assert train_mode_differences(bert, capture(bert, example_inputs=ids).graph_module) == []
    noisy = _bert(dropout=0.1)
    found = train_mode_differences(noisy, capture(noisy, example_inputs=ids).graph_module)
    assert len(found) == 1 and "dropout" in found[0]
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    assert ["BatchNorm" in d for d in train_mode_differences(bn, capture(bn).graph_module)] == [True]
    assert train_mode_differences(bn.eval(), capture(bn).graph_module) == []
    exported = capture(noisy, example_inputs=ids, method="export").graph_module
    assert mode_dependent_ops(exported) and not mode_dependent_ops(
        capture(bert, example_inputs=ids).graph_module
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _train_worker(rank: int, world: int, init: str) -> None:
    init_gloo(rank, world, init)
    records = _Records()
    logging.getLogger("torch_graphpipe").addHandler(records)
    try:
        seed = shared_seed()
        for k, name in enumerate(sorted(MODELS)):
            _check_hf(name, seed + k)
        assert not records.messages, records.messages  # dropout off: nothing differs
        _check_dropout_warns(seed, records)
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


def _check_hf(name: str, seed: int) -> None:
    build, loss_fn, make_target = MODELS[name]
    torch.manual_seed(seed)
    model = build()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (8, SEQ), generator=gen)
        batches.append((ids, make_target(ids, gen)))
    gp = GraphPipe(model, example_inputs=(batches[0][0],), loss_fn=loss_fn, num_microbatches=4)
    assert gp.plan.num_stages == dist.get_world_size()
    for ids, target in batches:  # two accumulation steps
        loss = gp.step(ids, target=target)
        ref_loss = loss_fn(ref(ids), target)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.item(), rtol=RTOL, atol=0, msg=name)
    ref_params = dict(ref.named_parameters())
    mine = []
    for pname, p in gp.module.named_parameters():
        mine.append(pname)
        assert p.grad is not None, f"{name}: {pname} has no gradient"
        torch.testing.assert_close(
            p.grad, ref_params[pname].grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=pname: f"{name} {n}: {m}"
        )
    held: list = [None] * dist.get_world_size()
    dist.all_gather_object(held, mine)
    assert sorted(n for part in held for n in part) == sorted(ref_params), name
    state = gp.state_dict()
    assert set(state) == set(ref.state_dict()), name


def _check_dropout_warns(seed: int, records: _Records) -> None:
    torch.manual_seed(seed)
    ids = torch.randint(0, VOCAB, (8, SEQ))
    gp = GraphPipe(_bert(dropout=0.1), example_inputs=(ids,), loss_fn=_bert_loss, num_microbatches=4)
    loss = gp.step(ids, target=torch.randint(0, 3, (8,)))
    assert loss == loss  # trains (not NaN); the masks differ from single-process training
    if dist.get_rank() == 0:
        assert any("will not match single-process training" in m and "dropout" in m for m in records.messages)
    records.messages.clear()
    gp.eval()  # the exported graph keeps train-mode dropout: said, not silent
    if mode_dependent_ops(gp.module):
        assert any("captured with torch.export in train mode" in m for m in records.messages), (
            records.messages
        )


@pytest.mark.distributed
def test_hugging_face_models_train_like_one_process():
    """BERT and GPT-2 from configs, no wrapper: 2 gloo ranks, losses and gradients equal one process."""
    spawn(_train_worker, 2)
