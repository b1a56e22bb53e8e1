"""Settings: frozen parts, the model part as the artifact's header, resolved once."""
import dataclasses
import json

import pytest
import torch

import train_gpt as T

CPU = torch.device("cpu")


def test_settings_cannot_be_assigned_after_validation():
    args = T.Hyperparameters.from_env({})
    args.validate(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.clip_sigmas = 7.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(args, "num_layers", 3)
    resolved = args.resolved(1, CPU)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.ttt_lr = 1.0
    for part in T.SETTING_PARTS.values():
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(T.settings_part(args, part), dataclasses.fields(part)[0].name, 0)


def test_every_setting_belongs_to_exactly_one_part():
    names = [f.name for part in T.SETTING_PARTS.values() for f in dataclasses.fields(part)]
    assert len(names) == len(set(names))
    assert set(names) == {f.name for f in dataclasses.fields(T.Hyperparameters)}


def test_the_artifact_header_is_the_model_part(monkeypatch):
    """A model setting added to ModelSettings reaches the header without another list to keep."""
    args = T.Hyperparameters(num_layers=3, mlp_mult=2.5, xsa_gate=True)  # xsa_gate: not at its "absent" value
    header = json.loads(T.pack_entries({}, args)[0][12:].decode())["config"]
    assert header == dataclasses.asdict(args.model)
    assert list(header) == [f.name for f in dataclasses.fields(T.ModelSettings)]
    assert "ttt_lr" not in header and "ngram_lift" not in header  # scoring settings are not the model's


def test_header_field_order_is_todays():
    """The header's bytes depend on the field order: an artifact stays byte for byte what it was."""
    assert [f.name for f in dataclasses.fields(T.ModelSettings)] == [
        "vocab_size", "bos_id", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "leaky_slope",
        "xsa_layers", "xsa_gate", "rope_dims", "rope_base", "qk_gain_init", "logit_softcap", "quant_bits",
        "train_seq_len", "skip_gates", "parallel_from", "recur_layers", "recur_passes", "attn_gate_width", "doc_mask"]


def test_a_model_setting_at_its_absent_value_stays_out_of_the_header():
    """A ModelSettings field that declares metadata={"absent": V} (V: the model before the field
    existed) is left out of the header at V, so such an artifact is what it was before the field
    existed; at another value it is in the header at its place."""
    fields = dataclasses.fields(T.ModelSettings)
    absent = {f.name: f.metadata["absent"] for f in fields if "absent" in f.metadata}
    assert absent == {"xsa_gate": False}
    today = T.Hyperparameters(num_layers=3)
    header = json.loads(T.pack_entries({}, today)[0][12:].decode())["config"]
    assert list(header) == [f.name for f in fields if f.name not in absent]
    assert header == {k: v for k, v in dataclasses.asdict(today.model).items() if k not in absent}
    gated = json.loads(T.pack_entries({}, dataclasses.replace(today, xsa_gate=True))[0][12:].decode())["config"]
    assert gated == {**dataclasses.asdict(today.model), "xsa_gate": True}
    assert list(gated) == [f.name for f in fields]
    for config in (header, gated):  # read back: the same model settings
        assert T.ModelSettings(**T.settings_from_header(config, "a.ptz")) == T.ModelSettings(
            **{**dataclasses.asdict(today.model), **config})


def test_resolved_makes_auto_values_concrete(tmp_path):
    args = T.Hyperparameters(data_path=str(tmp_path))
    r = args.resolved(2, CPU)
    assert (r.grad_accum_steps, r.compile, r.device, r.byte_sidecar, r.run_id) == (2, "0", "cpu", "0", "seed42")
    (tmp_path / "fineweb_val_bytes_000000.bin").write_bytes(b"")
    assert args.resolved(8, CPU).byte_sidecar == "1" and args.resolved(8, CPU).grad_accum_steps == 1
    given = T.Hyperparameters(grad_accum_steps=3, compile="1", run_id="x", byte_sidecar="0").resolved(1, CPU)
    assert (given.grad_accum_steps, given.compile, given.run_id, given.byte_sidecar) == (3, "1", "x", "0")
    assert args.resolved(1, CPU).resolved(1, CPU) == args.resolved(1, CPU)  # resolved once: a fixed point


def test_the_reserve_counts_the_calibration_and_refuses_one_that_leaves_no_training():
    """GPTQ_CALIB_SEQS=100000 was accepted and would have run its calibration past the 600 s: its
    forward passes are now in the reserve (the training loop gets less time), and a calibration
    that leaves no training time at all is refused before training."""
    args = T.Hyperparameters(mlp_mult=3.0, recur_passes=0, train_seq_schedule="")
    with torch.device("meta"):
        model = T.GPT(args.model)
    budget, reserve = T.training_budget(args, model, 1)
    assert 10.0 < reserve < 10.5 and budget == pytest.approx(600 - reserve)
    big = dataclasses.replace(args, gptq_calib_seqs=100_000)
    assert T.training_budget(big, model, 1)[1] > 300 > T.training_budget(big, model, 8)[1]  # split over the ranks
    with pytest.raises(T.ConfigError, match="leaves no time after"):
        T.training_budget(dataclasses.replace(args, gptq_calib_seqs=1_000_000), model, 1)


def test_an_mlp_with_no_hidden_unit_is_refused():
    with pytest.raises(T.ConfigError, match="MLP_MULT=0.001 leaves the MLP no hidden unit"):
        T.Hyperparameters(mlp_mult=0.001).validate(1)


def test_settings_that_change_no_number_leave_the_configuration_id_alone():
    """Seeds of one configuration average in submission.json: a collective timeout or the loader's
    read-ahead (the same batches) must not split them."""
    base = T.config_id(T.Hyperparameters(), b"code", 8, "H100")
    assert T.config_id(T.Hyperparameters(dist_timeout_seconds=60, loader_prefetch=True), b"code", 8, "H100") == base
    assert T.config_id(T.Hyperparameters(ttt_lr=2e-4), b"code", 8, "H100") != base
