"""Document masking: in a packed sequence, each token attends only to its own document."""

import pytest
import torch
from conftest import base_args, losses, small_model, train

from data.loader import PackedDocuments, document_ids

EOS = 2


def packs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two packs of [first document (6 tokens, EOS last) | second document (10 tokens)], whose first documents
    differ in every token but the EOS."""
    torch.manual_seed(0)
    first, changed = torch.randint(3, 97, (2, 5)), torch.randint(3, 97, (2, 5))
    second = torch.randint(3, 97, (2, 10))
    eos = torch.full((2, 1), EOS)
    return torch.cat([first, eos, second], 1), torch.cat([changed, eos, second], 1)


def test_document_ids_number_the_documents_of_each_row():
    rows = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 9, 9, 9, 9, 9, 9]])
    assert document_ids(rows, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.compat  # attention masks and flex's block masks change between torch versions
@pytest.mark.parametrize("backend,cap", [("eager", 30.0), ("sdpa", 0.0), ("flex", 30.0)])
def test_a_documents_logits_do_not_depend_on_the_document_before_it(backend, cap):
    model = small_model(attn_backend=backend, attn_logit_softcap=cap).eval()
    ids, changed = packs()
    with torch.no_grad():
        masked = [model(x, document_ids=document_ids(x, EOS)).logits for x in (ids, changed)]
        unmasked = [model(x).logits for x in (ids, changed)]
    # Not bitwise: the first document reroutes its own tokens, so the experts' matmuls see other batch shapes.
    torch.testing.assert_close(masked[0][:, 6:], masked[1][:, 6:], rtol=0, atol=1e-6)
    assert (unmasked[0][:, 6:] - unmasked[1][:, 6:]).abs().max() > 1e-4  # packed across: the change is seen
    # the first document sees only itself either way: masking changes nothing there
    torch.testing.assert_close(masked[0][:, :6], unmasked[0][:, :6], rtol=0, atol=1e-6)


@pytest.mark.compat  # attention masks and flex's block masks change between torch versions
def test_every_backend_masks_alike_and_one_document_is_plain_causal_attention():
    ids, _ = packs()
    documents = document_ids(ids, EOS)
    with torch.no_grad():
        eager = small_model(attn_backend="eager", attn_logit_softcap=30.0).eval()
        flex = small_model(attn_backend="flex", attn_logit_softcap=30.0).eval()
        flex.load_state_dict(eager.state_dict())
        torch.testing.assert_close(
            eager(ids, document_ids=documents).logits, flex(ids, document_ids=documents).logits, rtol=1e-5, atol=1e-5
        )
        single = torch.zeros_like(ids)
        torch.testing.assert_close(eager(ids, document_ids=single).logits, eager(ids).logits, rtol=0, atol=1e-6)


def test_document_ids_must_number_every_position():
    model = small_model()
    ids, _ = packs()
    with pytest.raises(ValueError, match="document_ids has shape"):
        model(ids, document_ids=document_ids(ids, EOS)[:, 1:])


def positions_within_documents(inputs: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(inputs.shape[-1]).expand_as(inputs)
    starts = torch.zeros_like(positions)
    starts[:, 1:] = torch.where(inputs[:, :-1] == EOS, positions[:, 1:], 0)
    return positions - starts.cummax(-1).values


@pytest.mark.compat
def test_restarting_positions_at_each_document_changes_nothing_under_rope():
    # Why the trainer does not offer it: a masked token sees only its own document, and RoPE only relative
    # positions, so the logits are those of positions counted from the pack's start (to rounding)
    ids, _ = packs()
    assert positions_within_documents(ids)[0].tolist() == [0, 1, 2, 3, 4, 5] + list(range(10))
    model = small_model(attn_backend="eager", attn_logit_softcap=30.0)
    documents = PackedDocuments(EOS)(ids)
    with torch.no_grad():
        packed = model(ids, **documents).logits
        restarted = model(ids, position_ids=positions_within_documents(ids), **documents).logits
    torch.testing.assert_close(restarted, packed, rtol=1e-5, atol=1e-5)


def test_the_trainer_masks_documents_when_asked_and_is_unchanged_when_not(data_dir, reference, tmp_path):
    single, _ = reference
    off = train(data_dir, tmp_path / "off", "--data.document_mask=false")
    assert losses(off) == losses(single)  # the default, spelled out: bitwise the run without the option
    masked = train(data_dir, tmp_path / "masked", "--data.document_mask=true")
    # the same weights see other attention from the first step on, and validate as they trained
    assert losses(masked)[0] != losses(single)[0]
    assert masked[-1]["val_loss"] != single[-1]["val_loss"]


@pytest.mark.distributed
def test_document_masking_on_two_processes_follows_one(data_dir, tmp_path):
    one = train(data_dir, tmp_path / "one", "--data.document_mask=true", steps=6)
    two = train(data_dir, tmp_path / "two", "--data.document_mask=true", nproc=2, steps=6)
    assert max(abs(a - b) for a, b in zip(losses(one), losses(two))) < 1e-5


@pytest.mark.parametrize(
    "flags,key",
    [
        (["--data.document_mask=true", "--parallel.strategy=fsdp", "--parallel.cp_size=2"], "data.document_mask"),
        (["--data.document_mask=true", "--parallel.strategy=fsdp", "--parallel.pp_size=2"], "data.document_mask"),
    ],
)
def test_document_options_refuse_what_they_cannot_do_in_one_line(data_dir, tmp_path, capsys, flags, key):
    from train.__main__ import main as train_main

    assert train_main([*base_args(data_dir, tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], err
