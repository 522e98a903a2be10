"""The loss section as a tagged union (method.md 2): each noise law carries only its own fields, naming
another law starts it from its defaults, and configs written before the union keep their run key."""
import pytest

import pipeline.config as C

ROOT = C.PRESETS_FILE.parents[1]

# Run keys computed before the union (commit 54fd274, when one flat loss section held every law's
# fields): checkpoints, snapshots and run folders made then must keep resuming and matching.
KEYS_BEFORE = {"defaults": "d9b0d32404f0c69c", "params.yaml": "dd90f998efc97ec1", "loguniform": "6bac13d7cbe62faa",
               "loguniform sigma_lo=0.01": "7b96987694a5b85d", "img512-xs": "303ea0ae1e4c9888"}


def test_run_keys_are_those_of_the_flat_section_before_the_union():
    got = {"defaults": C.Config().run_key(), "params.yaml": C.load_config(ROOT / "params.yaml").run_key(),
           "loguniform": C.resolve({}, {"loss.noise": "loguniform"}).run_key(),
           "loguniform sigma_lo=0.01": C.resolve({}, {"loss.noise": "loguniform", "loss.sigma_lo": 0.01}).run_key(),
           "img512-xs": C.resolve({"preset": "img512-xs"}).run_key()}
    assert got == KEYS_BEFORE


def test_each_law_holds_only_its_own_fields():
    for law in C.NOISE_LAWS:
        fields = set(C.resolve({}, {"loss.noise": law}).to_dict()["loss"])
        assert fields == {"noise", "sigma_data", *C.law_fields(law)}
    assert C.law_fields("lognormal") == ["P_mean", "P_std"] and C.law_fields("loguniform") == ["sigma_lo", "sigma_hi"]
    assert set(C.LOSS_LAWS) == set(C.NOISE_LAWS)


@pytest.mark.parametrize("overrides, message", [
    (["loss.sigma_lo=0.01"], "override: loss.sigma_lo=0.01 belongs to the loguniform noise law, not to "
                             "loss.noise=lognormal (whose fields are P_mean, P_std): set loss.noise=loguniform"),
    (["loss.noise=loguniform", "loss.P_std=1.2"], "override: loss.P_std=1.2 belongs to the lognormal noise law"),
    (["loss.noise=cosine"], "loss.noise='cosine': unknown noise law; choose one of lognormal, loguniform"),
    (["loss.noise=loguniform", "loss.sigma_lo=100"], "loss.sigma_lo=100.0 must be < loss.sigma_hi=80.0"),
    (["loss.P_std=0"], "loss.P_std=0: must be > 0"),        # the error names the field, not the union's variant
])
def test_a_field_of_another_law_or_a_bad_value_is_one_line(overrides, message):
    with pytest.raises(C.ConfigError) as info:
        C.load_config(ROOT / "params.yaml", overrides)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_naming_another_law_in_a_layer_above_starts_it_from_its_defaults(tmp_path):
    # params.yaml sets P_mean/P_std (lognormal); -S loss.noise=loguniform replaces the law
    cfg = C.load_config(ROOT / "params.yaml", ["loss.noise=loguniform"])
    assert cfg.to_dict()["loss"] == {"noise": "loguniform", "sigma_data": 0.5, "sigma_lo": 0.002, "sigma_hi": 80.0}
    # a preset's law (lognormal, P_mean -0.4) under a file that names the other law
    cfg = C.resolve({"preset": "img512-xs", "loss": {"noise": "loguniform", "sigma_lo": 0.01}})
    assert (cfg.loss.noise, cfg.loss.sigma_lo, cfg.loss.sigma_hi) == ("loguniform", 0.01, 80.0)
    # and back: a file on the loguniform law, the override names lognormal
    p = tmp_path / "params.yaml"
    p.write_text("loss: {noise: loguniform, sigma_lo: 0.01, sigma_hi: 10.0}\n")
    assert C.load_config(p, ["loss.noise=lognormal"]).to_dict()["loss"] == C.Config().to_dict()["loss"]


def test_a_flat_section_written_before_the_union_still_loads(tmp_path, capsys):
    flat = {"noise": "lognormal", "P_mean": -0.4, "P_std": 1.0, "sigma_lo": 0.002, "sigma_hi": 80.0, "sigma_data": 0.5}
    stored = C.resolve({"loss": flat}, where=None)                     # a checkpoint's config: silently
    assert capsys.readouterr().err == ""
    assert stored.to_dict()["loss"] == {"noise": "lognormal", "sigma_data": 0.5, "P_mean": -0.4, "P_std": 1.0}
    p = tmp_path / "old.yaml"                                          # a params file: a note per field
    p.write_text("loss: " + str(flat).replace("'", "") + "\n")
    assert C.load_config(p).run_key() == stored.run_key()
    err = capsys.readouterr().err
    assert "loss.sigma_lo=0.002 belongs to the loguniform noise law, unused with loss.noise=lognormal: ignored" in err
    p.write_text("loss: {noise: lognormal, sigma_lo: 0.01}\n")          # not the default: it would mislead
    with pytest.raises(C.ConfigError, match="old.yaml: loss.sigma_lo=0.01 belongs to the loguniform noise law"):
        C.load_config(p)
