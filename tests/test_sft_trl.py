"""The course's SFT loss equals TRL ``SFTTrainer``'s loss on the same batch.

Hermetic: a tokenizer trained in-process, a tiny random Llama, a two-example dataset; nothing is downloaded.

The batch goes through TRL's own data path (EOS appending, tokenization, completion masking, label building,
collation/padding), then

* TRL's loss is ``SFTTrainer.compute_loss(model, batch)`` (``loss_type="nll"``: summed token NLL divided by the
  number of labelled tokens after the shift), and
* the course's loss is the masked mean cross-entropy over the shifted labels of the very same batch.

``test_reference_equals_trl`` checks an in-file reference implementation; ``test_course_sft_loss_equals_trl``
checks ``course_utils.sft.sft_loss`` once it exists (skipped until then).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

ATOL = 1e-5

# Standard prompt-completion: TRL appends EOS to the completion text itself.
STANDARD = [
    {"prompt": "question: what is two plus two?", "completion": " answer: four."},
    {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog, two plus two."},
]
# Conversational prompt-completion: TRL renders the chat template (which already ends the assistant turn with
# <|im_end|><|eos|>\n) and does NOT append another EOS.
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "what is two plus two?"}],
        "completion": [{"role": "assistant", "content": "four."}],
    },
    {
        "prompt": [{"role": "user", "content": "the quick brown fox"}],
        "completion": [{"role": "assistant", "content": "jumps over the lazy dog, two plus two."}],
    },
]
FORMATS = {"standard": STANDARD, "conversational": CONVERSATIONAL}

CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "question: what is two plus two? answer: four.",
    "user asks, assistant answers: the dog jumps over the fox.",
] * 20


def reference_sft_loss(model, batch: dict) -> torch.Tensor:
    """Masked mean cross-entropy over assistant tokens; ``labels`` are NOT shifted (this function shifts)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    shift_logits = logits[:, :-1, :]
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100
    )


@pytest.fixture(scope="module")
def sft_tokenizer():
    from course_utils.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, 300)


def _expected_ids(tok, example) -> tuple[list[int], int]:
    """(prompt+completion ids, prompt length) as the course would build them, independently of TRL."""
    if isinstance(example["prompt"], str):
        prompt = tok(example["prompt"], add_special_tokens=False)["input_ids"]
        full = tok(example["prompt"] + example["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    else:
        prompt = tok.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tok.apply_chat_template(example["prompt"] + example["completion"], tokenize=True, return_dict=True)
        prompt, full = prompt["input_ids"], full["input_ids"]
    assert full[: len(prompt)] == prompt, "prompt must tokenize as a prefix of prompt+completion"
    return full, len(prompt)


@pytest.fixture(scope="module", params=sorted(FORMATS))
def trl_setup(request, sft_tokenizer, tmp_path_factory):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = sft_tokenizer
    examples = FORMATS[request.param]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        attention_dropout=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).float()
    args = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp(f"sft_{request.param}")),
        report_to=[],
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,  # TRL defaults bf16=True (autocast in training_step); keep fp32 for a 1e-5 comparison
        gradient_checkpointing=False,  # TRL defaults it to True
        completion_only_loss=True,  # the default for prompt-completion data anyway; explicit on purpose
        loss_type="nll",  # "dft" reweights tokens by their probability and would not match
        max_length=128,
        dataset_num_proc=None,
        seed=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()  # no dropout (Llama's only dropout is attention_dropout=0.0 anyway)
    return request.param, tok, model, trainer, examples, batch


def _trl_loss(trainer, model, batch) -> torch.Tensor:
    with torch.no_grad():
        return trainer.compute_loss(model, dict(batch)).float()


def test_trl_batch_masks_prompt_and_padding(trl_setup):
    fmt, tok, _, _, examples, batch = trl_setup
    assert set(batch) == {"input_ids", "attention_mask", "labels"}, sorted(batch)
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == att.shape == labels.shape and ids.shape[0] == len(examples)
    assert (att == 0).any(), "examples have different lengths, so the batch must contain padding"
    # padding is on the right, uses the pad token and is never labelled
    assert (ids[att == 0] == tok.pad_token_id).all()
    assert (labels[att == 0] == -100).all()

    expected = {}
    for ex in examples:
        full, plen = _expected_ids(tok, ex)
        expected[tuple(full)] = plen
    seen = set()
    for row in range(ids.shape[0]):
        real = ids[row][att[row] == 1].tolist()
        assert tuple(real) in expected, f"{fmt}: row {row} is not one of the tokenized examples"
        seen.add(tuple(real))
        plen = expected[tuple(real)]
        n = len(real)
        row_labels = labels[row]
        # prompt tokens are excluded, completion tokens (incl. EOS) are labelled with their own ids (unshifted)
        assert (row_labels[:plen] == -100).all()
        assert row_labels[plen:n].tolist() == real[plen:]
        assert int((row_labels != -100).sum()) == n - plen
        # derive the course-style labels independently and check TRL built exactly those
        derived = ids[row].clone()
        derived[:plen] = -100
        derived[att[row] == 0] = -100
        assert torch.equal(derived, row_labels)
        # EOS is in the loss: TRL appends it to standard completions; the chat template emits <|im_end|><|eos|>\n
        labelled = real[plen:]
        assert tok.eos_token_id in labelled
        if fmt == "standard":
            assert labelled[-1] == tok.eos_token_id and real.count(tok.eos_token_id) == 1
        else:
            assert tok.decode(labelled).endswith("<|im_end|><|eos|>\n")
    assert len(seen) == len(examples)


def test_reference_equals_trl(trl_setup):
    _, _, model, trainer, _, batch = trl_setup
    trl_loss = _trl_loss(trainer, model, batch)
    with torch.no_grad():
        ref = reference_sft_loss(model, batch)
        # Trainer.training_step passes num_items_in_batch = labels[..., 1:].ne(-100).sum() (over all
        # gradient-accumulation micro-batches); with one micro-batch on one device that is the same mean.
        n_items = batch["labels"][:, 1:].ne(-100).sum()
        trl_loss_n = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items).float()
    assert torch.isfinite(trl_loss) and trl_loss > 0
    assert abs(ref.item() - trl_loss.item()) < ATOL, (ref.item(), trl_loss.item())
    assert abs(trl_loss_n.item() - trl_loss.item()) < ATOL


def test_course_sft_loss_equals_trl(trl_setup):
    sft = pytest.importorskip("course_utils.sft")
    sft_loss = getattr(importlib.import_module(sft.__name__), "sft_loss", None)
    if sft_loss is None:
        pytest.skip("course_utils.sft.sft_loss is not written yet")
    _, _, model, trainer, _, batch = trl_setup
    trl_loss = _trl_loss(trainer, model, batch)
    course_batch = {k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        course = sft_loss(model, course_batch)
    assert course.ndim == 0
    assert abs(float(course) - trl_loss.item()) < ATOL, (float(course), trl_loss.item())
