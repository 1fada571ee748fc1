"""The paths commands take and write, through the command line: a run folder stands for its encoder, and a file that
is not an encoder says what it is."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import checkpoint
from test_cli_eval import COMMON, encoder_file, labelled  # noqa: F401  (fixtures)

runner = CliRunner()


def the_error(result) -> str:
    """The one line a refused command prints (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


# --- a run folder stands for its encoder; a training state names the encoder to use --------------------------


def test_a_run_folder_is_accepted_wherever_an_encoder_is(encoder_file, labelled, tmp_path):
    run = encoder_file.parent
    shown = runner.invoke(app, ["info", str(run), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["path"] == str(encoder_file)
    knn = runner.invoke(app, ["knn", str(run), "--data", str(labelled), "-k", "3", *COMMON])
    assert knn.exit_code == 0, knn.output
    assert list((run / "eval").glob("knn-*/results.json"))  # beside the encoder, as for the file itself
    exported = runner.invoke(app, ["export", str(run), "--to", "safetensors-encoder"])
    assert exported.exit_code == 0, exported.output
    assert (run / "encoder-safetensors-encoder.safetensors").is_file()
    embedded = runner.invoke(app, ["embed", str(labelled / "val"), "-o", str(tmp_path / "v.npy"), "-c", str(run), *COMMON])
    assert embedded.exit_code == 0, embedded.output

    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert "is a folder without an encoder.safetensors" in the_error(runner.invoke(app, ["info", str(empty)]))


def test_a_training_state_given_as_an_encoder_names_the_run_s_encoder(encoder_file, tmp_path):
    run = encoder_file.parent
    state = run / "checkpoints" / "step-000000010.safetensors"
    checkpoint.save(state, {"w": checkpoint.torch.zeros(2)}, kind=checkpoint.TRAIN_STATE, meta={"step": 10, "epoch": 1})
    line = the_error(runner.invoke(app, ["info", str(state)]))
    assert line == (f"error: {state} is a training-state checkpoint (what --resume reads), not an encoder; "
                    f"its run's encoder is {encoder_file}")


def test_a_small_text_file_given_as_a_checkpoint_is_not_a_safetensors_file(tmp_path):
    notes = tmp_path / "encoder.safetensors"
    notes.write_text("hello\n")
    line = the_error(runner.invoke(app, ["info", str(notes)]))
    assert line == f"error: {notes} is not a safetensors file: it is a text file of 6 bytes; pass a checkpoint written by simclr"
