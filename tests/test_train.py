import shutil

import torch

from cvdd.config import TrainConfig
from cvdd.data import load_digits_dataset
from cvdd.models import create_model
from cvdd.train import evaluate_top1, train_model

CFG = TrainConfig(optimizer="sgd", lr=0.05, batch_size=64, epochs=3, crop_scale=(0.5, 1.0), flip=False)


def fresh_model():
    torch.manual_seed(0)
    return create_model("resnet18", 10, 1, 8, 0.125)


def test_resume_matches_uninterrupted_run(tmp_path):
    digits = load_digits_dataset()
    state = tmp_path / "member.partial.pt"
    full = fresh_model()
    history = train_model(full, digits, CFG, torch.device("cpu"), seed=3, state_path=state, state_key="k")
    assert len(history) == 3
    # The last saved state is the one after epoch 2, as a run killed during epoch 3 leaves it.
    saved = torch.load(state, weights_only=False)
    assert saved["epoch"] == 2

    kept = tmp_path / "copy.partial.pt"
    shutil.copy(state, kept)
    resumed = fresh_model()
    resumed_history = train_model(resumed, digits, CFG, torch.device("cpu"), seed=3, state_path=kept,
                                  state_key="k")
    assert [h["epoch"] for h in resumed_history] == [1, 2, 3]
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_resume_ignores_state_of_other_config(tmp_path):
    digits = load_digits_dataset()
    state = tmp_path / "member.partial.pt"
    train_model(fresh_model(), digits, CFG, torch.device("cpu"), seed=3, state_path=state, state_key="old")
    model = fresh_model()
    history = train_model(model, digits, CFG, torch.device("cpu"), seed=3, state_path=state, state_key="new")
    assert len(history) == 3
    assert torch.load(state, weights_only=False)["key"] == "new"


def test_training_learns_digits():
    digits = load_digits_dataset()
    model = fresh_model()
    before = evaluate_top1(model, digits.test, digits, torch.device("cpu"))
    train_model(model, digits, CFG, torch.device("cpu"), seed=0)
    after = evaluate_top1(model, digits.test, digits, torch.device("cpu"))
    assert after > before + 0.3
