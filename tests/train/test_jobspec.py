"""Job specs: defaults, overrides, every kind of error message, bool-vs-int, and the TOML round trip."""
import pickle

import pytest

from disttrain.train.jobspec import (PTB_ENV_VAR, PTB_FALLBACK, PTB_URL, SCHEMA, JobSpec, JobSpecError,
                                     check_paths, describe_schema, job_differences, load_job, loads_job)


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path, overrides=()):
    with pytest.raises(JobSpecError) as info:
        load_job(path, overrides)
    return info.value


# --------------------------------------------------------------------------------------------- defaults

def test_empty_file_gets_every_default(tmp_path, monkeypatch):
    monkeypatch.delenv(PTB_ENV_VAR, raising=False)
    spec = load_job(write(tmp_path, ""))
    assert spec.to_dict() == {
        "model": {"kind": "lstm_lm", "factory": None, "hidden": 200, "embed": 200, "layers": 2, "dropout": 0.0,
                  "init_scale": 0.1, "tie_weights": False, "d_model": None, "heads": None, "d_ff": None,
                  "max_len": None, "options": {}},
        "data": {"kind": "default_corpus", "factory": None, "path": None, "batch_size": 20, "bptt": 35,
                 "max_bytes": 2_000_000, "options": {}},
        "optim": {"kind": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "clip_norm": None, "loss": "token_mean",
                  "decay_after_epoch": 0, "decay": 1.0, "warmup_steps": 0},
        "train": {"epochs": 1, "max_steps": None, "eval_every": "epoch", "checkpoint_every": 500,
                  "keep_checkpoints": 2, "keep_best": False, "on_nonfinite": "stop", "log_every": 50, "seed": 0,
                  "device": "cpu"},
        "memory": {"activation_checkpointing": "none", "budget_mb": None},
        "parallel": {"mode": "local", "bucket_mb": 25.0, "overlap": "auto", "shard_optimizer": 0, "stages": 2,
                     "micro_batches": 4,
                     "schedule": "1f1b", "split_points": None, "stage_checkpointing": False,
                     "timeout_s": 300.0},
        "ps": {"servers": 1, "workers": 2, "consistency": "async", "staleness": 3, "overlap": False,
               "scale_pushes": True, "heartbeat_interval": 1.0, "heartbeat_timeout": 10.0, "reconnect_timeout": 120.0,
               "snapshot_every": 500, "snapshot_every_s": 60.0, "reject_nonfinite": True, "log_every": 10.0},
    }
    assert spec.source == str(tmp_path / "job.toml")


def test_given_values_and_derived_defaults(tmp_path):
    spec = load_job(write(tmp_path, """
[model]
hidden = 650
dropout = 0.5
[optim]
lr = 1
clip_norm = 5
decay_after_epoch = 6
decay = 0.8
[train]
eval_every = 100
[memory]
activation_checkpointing = 4
"""))
    assert spec.model.hidden == 650 and spec.model.embed == 650       # embed defaults to hidden
    assert spec.model["dropout"] == 0.5
    assert spec.optim.lr == 1.0 and isinstance(spec.optim.lr, float)  # ints are accepted as floats
    assert spec.optim.clip_norm == 5.0 and isinstance(spec.optim.clip_norm, float)
    assert spec.train.eval_every == 100
    assert spec.memory.activation_checkpointing == 4


def test_each_model_family_gets_only_its_own_keys():
    transformer = loads_job('[model]\nkind = "transformer_lm"\n').model
    assert (transformer.hidden, transformer.embed, transformer.init_scale) == (None, None, None)
    assert (transformer.d_model, transformer.heads, transformer.d_ff, transformer.max_len) == (128, 4, 512, 256)
    factory = loads_job('[model]\nfactory = "pkg.mod:build"\nhidden = 64\nd_model = 8\n').model   # reads any key
    assert (factory.hidden, factory.embed, factory.d_model) == (64, 64, 8)


@pytest.mark.parametrize("text, override, key, kind", [
    ('[model]\nkind = "transformer_lm"\nhidden = 300\n', (), "hidden = 300", "transformer_lm"),
    ('[model]\nkind = "transformer_lm"\n', ("model.init_scale=0.5",), "init_scale = 0.5", "transformer_lm"),
    ("[model]\nd_model = 64\n", (), "d_model = 64", "lstm_lm"),
    ("", ("model.heads=2",), "heads = 2", "lstm_lm"),
])
def test_a_key_of_another_model_family_is_refused(tmp_path, text, override, key, kind):
    """It would be ignored: the run would train another model than the job file says."""
    error = errors_of(write(tmp_path, text), override)
    where = f'override "{override[0]}"' if override else "job.toml"
    assert len(error.errors) == 1 and f'{where}: [model] {key}: kind = "{kind}" does not use it (its keys: ' in str(error)


def test_a_factorys_own_settings_come_from_options_in_the_file_or_on_the_command_line(tmp_path):
    path = write(tmp_path, '[model]\nfactory = "pkg.mod:build"\noptions = {width = 32, act = "relu"}\n')
    spec = load_job(path, ["model.options.width=64", "model.options.depth=3"])
    assert spec.model.options == {"width": 64, "act": "relu", "depth": 3}
    assert loads_job(spec.to_toml()).model.options == spec.model.options          # config.toml reads back
    assert loads_job("").model.options == {} and loads_job("").data.options == {}


@pytest.mark.parametrize("text, override, said", [
    ('[model]\noptions = {width = 32}\n', (), "job.toml: [model] options = {width = 32}: only a factory reads them"),
    ("", ("data.options.noise=0.1",), 'override "data.options.noise=0.1": [data] options = {noise = 0.1}: only a '
                                      "factory reads them"),
    ("", ("model.hidden.x=1",), "[model] hidden is not a table: a dotted key names an entry of [model] or [data] "
                                "options only"),
    ('[model]\nfactory = "p.m:f"\noptions = 3\n', (), "[model] options = 3: expected a table of your own settings"),
])
def test_options_without_a_factory_or_of_the_wrong_shape_are_refused(tmp_path, text, override, said):
    assert said in str(errors_of(write(tmp_path, text), override))


def test_a_job_recorded_before_options_existed_is_the_same_job():
    job = loads_job("").to_dict()
    earlier = {section: {k: v for k, v in keys.items() if k != "options"} for section, keys in job.items()}
    assert job_differences(earlier, job) == []


def test_job_comparisons_skip_the_keys_neither_family_reads():
    """A checkpoint written before each family got only its own keys recorded the LSTM's for a Transformer."""
    job = loads_job('[model]\nkind = "transformer_lm"\n').to_dict()
    earlier = {**job, "model": {**job["model"], "hidden": 200, "embed": 200, "init_scale": 0.1}}
    assert job_differences(earlier, job) == []
    lstm = loads_job("").to_dict()
    assert {key for section, key, *_ in job_differences(lstm, job)} == {
        "kind", "hidden", "embed", "init_scale", "d_model", "heads", "d_ff", "max_len"}


def test_ptb_path_defaults_to_env_var_then_fallback(tmp_path, monkeypatch):
    job = write(tmp_path, '[data]\nkind = "ptb"\n')
    monkeypatch.delenv(PTB_ENV_VAR, raising=False)
    assert load_job(job).data.path == PTB_FALLBACK == "../shared/data/ptb"
    monkeypatch.setenv(PTB_ENV_VAR, "/somewhere/ptb")
    assert load_job(job).data.path == "/somewhere/ptb"
    assert load_job(write(tmp_path, '[data]\nkind = "ptb"\npath = "x"\n')).data.path == "x"


def test_spec_is_read_only_and_names_unknown_attributes(tmp_path):
    spec = load_job(write(tmp_path, ""))
    with pytest.raises(AttributeError, match="read-only"):
        spec.model.hidden = 3
    with pytest.raises(AttributeError, match="read-only"):
        spec.model = None
    with pytest.raises(AttributeError, match='did you mean "hidden"'):
        spec.model.hiden
    with pytest.raises(AttributeError, match=r"did you mean \[model\]"):
        spec.modle


def test_spec_pickles(tmp_path):
    spec = load_job(write(tmp_path, "[model]\nhidden = 7\n"))
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.source == spec.source and again.model.hidden == 7


# -------------------------------------------------------------------------------------------- overrides

def test_overrides_parse_toml_values_and_bare_strings(tmp_path):
    job = write(tmp_path, "[optim]\nlr = 1.0\n[train]\nepochs = 13\n")
    spec = load_job(job, ["optim.lr=0.5", "train.epochs = 2", "train.device=cuda", 'optim.kind="adam"',
                          "model.tie_weights=true", "memory.activation_checkpointing=sqrt",
                          "optim.clip_norm=5"])
    assert spec.optim.lr == 0.5
    assert spec.train.epochs == 2
    assert spec.train.device == "cuda"            # bare string
    assert spec.optim.kind == "adam"              # quoted TOML string
    assert spec.model.tie_weights is True
    assert spec.memory.activation_checkpointing == "sqrt"
    assert spec.optim.clip_norm == 5.0


def test_override_fixes_a_bad_value_in_the_file(tmp_path):
    job = write(tmp_path, '[optim]\nlr = "fast"\n')
    assert load_job(job, ["optim.lr=0.1"]).optim.lr == 0.1


def test_later_override_wins(tmp_path):
    assert load_job(write(tmp_path, ""), ["model.layers=3", "model.layers=4"]).model.layers == 4


def test_override_without_equals_is_named(tmp_path):
    err = errors_of(write(tmp_path, ""), ["optim.lr"])
    assert 'override "optim.lr"' in str(err) and "section.key=value" in str(err)
    err = errors_of(write(tmp_path, ""), ["lr=3"])
    assert 'override "lr=3"' in str(err) and "section.key=value" in str(err)


def test_override_with_unknown_key_or_section_is_named(tmp_path):
    job = write(tmp_path, "")
    err = errors_of(job, ["model.hiden=3"])
    message = str(err)
    assert 'override "model.hiden=3"' in message and '"hiden"' in message
    assert 'did you mean "hidden"' in message and "valid keys in [model]: kind, factory, hidden, embed" in message
    err = errors_of(job, ["optm.lr=3"])
    assert 'override "optm.lr=3"' in str(err) and "did you mean [optim]" in str(err)


def test_override_with_bad_value_names_override_key_value_and_expectation(tmp_path):
    err = errors_of(write(tmp_path, "", name="x.toml"), ["optim.lr=fast"])
    assert str(err) == f'{tmp_path / "x.toml"}: override "optim.lr=fast": [optim] lr = "fast": expected a float > 0'


# ------------------------------------------------------------------------------------------ value errors

def test_bad_value_message_names_file_key_value_expected(tmp_path):
    path = write(tmp_path, '[optim]\nlr = "fast"\n', name="x.toml")
    err = errors_of(path)
    assert str(err) == f'{path}: [optim] lr = "fast": expected a float > 0'
    assert err.errors == [str(err)]
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("section, key, value, expected", [
    ("model", "hidden", "0", "an int > 0"),
    ("model", "hidden", "2.5", "an int > 0"),
    ("model", "kind", '"gru"', 'one of "lstm_lm", "transformer_lm"'),
    ("model", "dropout", "1.0", "a float in [0, 1)"),
    ("model", "dropout", "-0.1", "a float in [0, 1)"),
    ("model", "init_scale", "0", "a float > 0"),
    ("model", "tie_weights", "1", "a bool (true or false)"),
    ("data", "kind", '"wiki"', 'one of "ptb", "chars", "default_corpus"'),
    ("data", "path", '""', "a path"),
    ("data", "max_bytes", "-1", "an int > 0"),
    ("optim", "momentum", "-1", "a float >= 0"),
    ("optim", "clip_norm", "0", "a float > 0"),
    ("optim", "decay", "0", "a float in (0, 1]"),
    ("optim", "decay", "1.5", "a float in (0, 1]"),
    ("optim", "lr", "inf", "a float > 0"),
    ("optim", "lr", "nan", "a float > 0"),
    ("optim", "decay_after_epoch", "-1", "an int >= 0"),
    ("train", "eval_every", '"step"', '"epoch" or an int > 0'),
    ("train", "eval_every", "0", '"epoch" or an int > 0'),
    ("train", "device", '"gpu"', 'one of "cpu", "cuda"'),
    ("train", "max_steps", "[1, 2]", "an int > 0"),
    ("memory", "activation_checkpointing", '"all"', '"none", "sqrt", "auto" or an int > 0'),
    ("parallel", "mode", '"mpi"', 'one of "local", "data", "pipeline", "ps"'),
    ("parallel", "bucket_mb", "0", "a float > 0"),
])
def test_each_bad_value_is_reported(tmp_path, section, key, value, expected):
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    err = errors_of(path)
    assert str(err).startswith(f"{path}: [{section}] {key} = ")
    assert f": expected {expected}" in str(err)


def test_bools_are_not_ints_nor_floats(tmp_path):
    err = errors_of(write(tmp_path, "[model]\nhidden = true\n[optim]\nlr = true\n[train]\neval_every = true\n"))
    assert err.errors[0].endswith("[model] hidden = true: expected an int > 0")
    assert err.errors[1].endswith("[optim] lr = true: expected a float > 0")
    assert err.errors[2].endswith('[train] eval_every = true: expected "epoch" or an int > 0')


def test_close_choice_gets_a_suggestion(tmp_path):
    err = errors_of(write(tmp_path, '[model]\nkind = "lstm"\n'))
    assert 'did you mean "lstm_lm"?' in str(err)


def test_chars_requires_a_path(tmp_path):
    path = write(tmp_path, '[data]\nkind = "chars"\n')
    err = errors_of(path)
    assert str(err).startswith(f"{path}: [data] path is missing: expected a path")
    assert 'kind = "chars"' in str(err)


# -------------------------------------------------------------------------------------- structure errors

def test_unknown_section_is_named_with_suggestion_and_valid_list(tmp_path):
    path = write(tmp_path, "[optimizer]\nlr = 1\n")
    message = str(errors_of(path))
    assert message.startswith(f"{path}: unknown section [optimizer]")
    assert "did you mean [optim]?" in message
    assert "valid sections: [model], [data], [optim], [train], [memory], [parallel]" in message


def test_unknown_key_is_named_with_suggestion_and_valid_list(tmp_path):
    path = write(tmp_path, "[train]\nepoch = 3\n")
    message = str(errors_of(path))
    assert message.startswith(f'{path}: [train] unknown key "epoch"')
    assert 'did you mean "epochs"?' in message
    assert "valid keys in [train]: " + ", ".join(f.name for f in SCHEMA["train"]) in message


def test_key_outside_any_section(tmp_path):
    path = write(tmp_path, "lr = 1\n[model]\n")
    message = str(errors_of(path))
    assert message.startswith(f"{path}: lr = 1 is outside any section")
    assert "[optim]" in message


def test_section_that_is_not_a_table(tmp_path):
    path = write(tmp_path, "model = 3\n")
    assert str(errors_of(path)) == f"{path}: model = 3: expected a section [model]"


def test_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "[model]\nhidden = 200\nlayers = = 2\n")
    message = str(errors_of(path))
    assert message.startswith(f"{path}: TOML syntax error")
    assert "line 3" in message


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.toml"
    message = str(errors_of(path))
    assert message.startswith(f"{path}: no such job file")


def test_directory_instead_of_file(tmp_path):
    assert "is a directory" in str(errors_of(tmp_path))


def test_all_errors_are_reported_together_one_per_line(tmp_path):
    path = write(tmp_path, """
[modle]
hidden = 3
[model]
hiden = 3
layers = 0
[optim]
lr = "fast"
decay = 2
[train]
device = "gpu"
""")
    err = errors_of(path, ["train.epochs=-1", "nonsense"])
    lines = str(err).split("\n")
    assert lines == err.errors and len(lines) == 8
    assert all(line.startswith(f"{path}: ") for line in lines)
    joined = str(err)
    for fragment in ["unknown section [modle]", '[model] unknown key "hiden"', "[model] layers = 0",
                     '[optim] lr = "fast"', "[optim] decay = 2", '[train] device = "gpu"',
                     'override "train.epochs=-1": [train] epochs = -1', 'override "nonsense"']:
        assert fragment in joined


# --------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("text, overrides", [
    ("", ()),
    ('[data]\nkind = "ptb"\npath = "/data/ptb"\n[optim]\nclip_norm = 5\nlr = 1\n', ["train.max_steps=10"]),
    ('[data]\nkind = "chars"\npath = "a \\"quoted\\" \\\\ path\\twith\\u0001 ctrl é"\n'
     '[model]\nembed = 64\ndropout = 0.25\ninit_scale = 1e-5\n[optim]\nlr = 3e20\n'
     '[memory]\nactivation_checkpointing = "sqrt"\n', ["train.eval_every=7"]),
])
def test_to_toml_round_trips(tmp_path, text, overrides):
    spec = load_job(write(tmp_path, text), overrides)
    again = load_job(write(tmp_path, spec.to_toml(), name="resolved.toml"))
    assert again.to_dict() == spec.to_dict()
    assert again == spec
    assert loads_job(spec.to_toml()) == spec


def test_to_toml_marks_unset_keys_as_comments(tmp_path):
    text = load_job(write(tmp_path, "")).to_toml()
    assert "# clip_norm (unset)" in text and "\nclip_norm" not in text
    assert "[parallel]\nmode = \"local\"\nbucket_mb = 25.0\n" in text


# --------------------------------------------------------------------------------------------- data paths

def _ptb_dir(root, splits=("train", "valid", "test"), gz=True):
    root.mkdir()
    for split in splits:
        (root / f"ptb.{split}.txt{'.gz' if gz else ''}").write_bytes(b"")
    return root


def test_check_paths_accepts_ptb_gz_and_plain(tmp_path):
    for name, gz in [("gz", True), ("plain", False)]:
        ptb = _ptb_dir(tmp_path / name, gz=gz)
        spec = loads_job(f'[data]\nkind = "ptb"\npath = "{ptb}"\n')
        assert check_paths(spec) == ptb


def test_check_paths_ptb_missing_split(tmp_path, monkeypatch):
    monkeypatch.delenv(PTB_ENV_VAR, raising=False)
    ptb = _ptb_dir(tmp_path / "ptb", splits=("train",))
    job = write(tmp_path, f'[data]\nkind = "ptb"\npath = "{ptb}"\n')
    with pytest.raises(JobSpecError) as info:
        check_paths(load_job(job))
    message = str(info.value)
    assert message.startswith(f'{job}: [data] path = "{ptb}"')
    assert "ptb.valid.txt(.gz), ptb.test.txt(.gz)" in message and "ptb.train" not in message.split(";")[0]
    assert PTB_ENV_VAR in message and PTB_URL in message and "data/ptb.*.txt" in message


def test_check_paths_ptb_missing_directory_resolves_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PTB_ENV_VAR, "no/such/dir")
    job = write(tmp_path, '[data]\nkind = "ptb"\n')
    with pytest.raises(JobSpecError) as info:
        check_paths(load_job(job))
    message = str(info.value)
    assert '[data] path = "no/such/dir"' in message
    assert str(tmp_path / "no" / "such" / "dir") in message and "does not exist" in message
    assert f"{PTB_ENV_VAR} environment variable (now 'no/such/dir')" in message
    assert PTB_URL in message


def test_check_paths_chars(tmp_path):
    text = tmp_path / "book.txt"
    spec = loads_job(f'[data]\nkind = "chars"\npath = "{text}"\n', source="jobs/c.toml")
    with pytest.raises(JobSpecError) as info:
        check_paths(spec)
    assert str(info.value).startswith(f'jobs/c.toml: [data] path = "{text}"')
    assert "does not exist" in str(info.value) and "expected a text file" in str(info.value)
    text.write_text("hello")
    assert check_paths(spec) == text


def test_check_paths_default_corpus_needs_nothing():
    assert check_paths(loads_job("")) is None


def test_describe_schema_lists_every_field():
    table = describe_schema()
    for section, fields in SCHEMA.items():
        for field in fields:
            assert f"| [{section}] {field.name} |" in table


def test_jobspec_is_built_only_from_valid_sections():
    assert isinstance(loads_job("[parallel]\nmode = \"data\"\n"), JobSpec)


def test_the_ptb_fallback_beside_the_checkout_serves_a_job_started_elsewhere(tmp_path, monkeypatch):
    from disttrain.data import ptb

    monkeypatch.delenv(PTB_ENV_VAR, raising=False)
    monkeypatch.setattr(ptb, "__file__", str(tmp_path / "repo" / "disttrain" / "data" / "ptb.py"))
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    job = write(tmp_path, '[data]\nkind = "ptb"\n')
    assert load_job(job).data.path == PTB_FALLBACK                   # nowhere: the fallback as it is, named so
    (tmp_path / "shared" / "data" / "ptb").mkdir(parents=True)       # beside the checkout (repo/)
    assert load_job(job).data.path == str(tmp_path / "shared" / "data" / "ptb")
    monkeypatch.chdir(tmp_path / "repo")                             # from the checkout: relative, as before
    assert load_job(job).data.path == PTB_FALLBACK
