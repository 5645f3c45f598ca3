"""course_utils.dpo: the DPO / IPO losses equal TRL DPOTrainer's on the same batch; bad input is refused."""

from __future__ import annotations

import copy
import math
import tempfile
import warnings

import pytest
import torch

from course_utils import dpo
from course_utils.errors import ConfigError, DataError
from course_utils.world import preference_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _models(tokenizer):
    """A tiny causal LM (the policy, nudged away from its start) and an untouched copy (the reference)."""
    from course_utils.model import build_model, make_config
    from course_utils.profiles import ModelSize

    size = ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=128)
    ref = build_model(make_config(size, tokenizer), seed=0).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))  # otherwise every log-ratio is 0 and every loss log 2
    return policy.eval(), ref


@pytest.fixture(scope="module", params=["sigmoid", "ipo"])
def trl_batch(request, tokenizer):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, ref = _models(tokenizer)
    rows = [r for r in preference_pairs(0, 12, "train") if not r["meta"]["is_tie"]][:4]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=tmp, report_to="none", save_strategy="no", per_device_train_batch_size=4,
                         use_cpu=True, bf16=False, beta=0.5, loss_type=[request.param], max_length=128)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            trl_loss = trainer.compute_loss(policy, dict(batch)).item()
    return request.param, policy, ref, batch, trl_loss


def test_dpo_loss_equals_trl(trl_batch):
    loss_type, policy, ref, batch, trl_loss = trl_batch
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        pol, n_tokens = dpo.sequence_logprobs(policy, ids, mask, completion)
        ref_lp, _ = dpo.sequence_logprobs(ref, ids, mask, completion)
    (pc, pr), (rc, rr), (nc, nr) = pol.chunk(2), ref_lp.chunk(2), n_tokens.chunk(2)  # TRL: chosen rows first
    out = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, chosen_tokens=nc, rejected_tokens=nr)
    assert abs(trl_loss - math.log(2)) > 0.01 or loss_type == "ipo", "log-ratios too small: the test would not bite"
    assert out["losses"].mean().item() == pytest.approx(trl_loss, abs=1e-5)
    # and it can tell: chosen and rejected swapped give another number
    swapped = dpo.dpo_loss(pr, pc, rr, rc, beta=0.5, loss_type=loss_type, chosen_tokens=nr, rejected_tokens=nc)
    assert abs(swapped["losses"].mean().item() - trl_loss) > 1e-3


def test_implicit_rewards_and_accuracy():
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0])
    rc, rr = torch.tensor([-10.5, -11.0]), torch.tensor([-10.0, -10.0])
    out = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert out["chosen_rewards"].tolist() == pytest.approx([0.05, -0.1])
    assert out["rejected_rewards"].tolist() == pytest.approx([-0.1, 0.1])
    assert out["margins"].tolist() == pytest.approx([0.15, -0.2]) and out["accuracy"].item() == 0.5
    assert out["losses"].tolist() == pytest.approx([math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.2))])


def test_bad_input_is_refused(tokenizer):
    x = torch.zeros(2)
    with pytest.raises(ConfigError):
        dpo.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ConfigError):
        dpo.dpo_loss(x, x, x, x, loss_type="ipo")  # no completion lengths
    with pytest.raises(ConfigError):
        dpo.dpo_loss(x, x, x, x, loss_type="kto")
    policy, _ = _models(tokenizer)
    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 6, 7]])
    with pytest.raises(DataError, match="no completion token"):
        dpo.sequence_logprobs(policy, ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]))
