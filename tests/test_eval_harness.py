"""The evaluation harness: answers files in the authors' format, the official servers' files,
identities and reuse, ``mvlm eval score``, and the PyTorch and llama.cpp backends on the same
questions."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.quality.eval_sets import EvalSet, read_eval_set
from tasks.quality.eval_specs import find_eval_spec
from tasks.quality.harness import ANSWERS_FILE, run_benchmark, score_file
from tasks.quality.predictions import read_answers
from tasks.quality.scoring import AnswersError, EvalItem

pytest_plugins = ("export_fixtures",)
BENCHMARKS = ("gqa", "sqa", "textvqa", "pope", "mme", "mmbench")


def _set(name: str, root: Path, **changes: Any) -> EvalSet:
    spec = find_eval_spec(name)[1]
    return read_eval_set(spec.model_copy(update=changes) if changes else spec, root)


def _truth_text(item: EvalItem) -> str:
    truth = item.truth[0] if isinstance(item.truth, list) else item.truth
    return {"yes": "Yes", "no": "No"}.get(truth, truth)


class Oracle:
    """Answers every question with its reference (the way a perfect model would write it), the
    first ``wrong`` ones wrongly; it checks that questions come in item order with their images."""

    def __init__(self, items: Sequence[EvalItem], name: str = "oracle", wrong: int = 0) -> None:
        self.items, self.name, self.wrong, self.asked = list(items), name, wrong, 0

    def answer(self, questions: Sequence[str], images: Sequence[Any], max_new_tokens: int) -> list[str]:
        out = []
        for question, image in zip(questions, images, strict=True):
            item = self.items[self.asked % len(self.items)]
            assert question == item.prompt and (image is None) == (item.image is None)
            assert image is None or image.mode == "RGB", "images arrive decoded"
            self.asked += 1
            out.append("zzz" if self.asked <= self.wrong else _truth_text(item))
        return out

    def close(self) -> None:
        return None


class AlwaysYes(Oracle):
    def answer(self, questions: Sequence[str], images: Sequence[Any], max_new_tokens: int) -> list[str]:
        return ["Yes"] * len(questions)


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_a_perfect_answerer_scores_full_marks_on_each_replica(eval_replicas: Path, tmp_path: Path,
                                                              benchmark: str) -> None:  # fmt: skip
    eval_set = _set(f"tiny-{benchmark}", eval_replicas)
    run = run_benchmark(Oracle(eval_set.items), eval_set, tmp_path, "oracle", "m1")
    full = (
        2000.0 * len({i.group.get("subtask") for i in eval_set.items}) / 10 if benchmark == "mme" else 100.0
    )
    assert run.score.headline == pytest.approx(full)
    assert run.questions == len(eval_set.items) and run.seconds > 0
    rows = [json.loads(line) for line in (tmp_path / ANSWERS_FILE).read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [i.question_id for i in eval_set.items]
    assert score_file(eval_set, tmp_path / ANSWERS_FILE).headline == run.score.headline


def test_always_yes_is_chance_on_pope_and_mme(eval_replicas: Path, tmp_path: Path) -> None:
    pope = _set("tiny-pope", eval_replicas)
    run = run_benchmark(AlwaysYes(pope.items), pope, tmp_path / "pope", "yes", "m1")
    for split in ("adversarial", "popular", "random"):
        assert (
            run.score.metrics[f"{split}/accuracy"] == 0.5 and run.score.metrics[f"{split}/yes_ratio"] == 1.0
        )
        assert run.score.metrics[f"{split}/f1"] == pytest.approx(2 / 3)  # precision 1/2, recall 1
    mme = _set("tiny-mme", eval_replicas)
    run = run_benchmark(AlwaysYes(mme.items), mme, tmp_path / "mme", "yes", "m1")
    subtasks = len({i.group["subtask"] for i in mme.items})
    assert run.score.headline == pytest.approx(50.0 * subtasks)  # accuracy 50, accuracy+ 0 per subtask


def test_a_finished_evaluation_is_reused_and_a_different_model_is_not(
    eval_replicas: Path, tmp_path: Path
) -> None:
    gqa = _set("tiny-gqa", eval_replicas, limit=10)
    first = Oracle(gqa.items, wrong=3)
    run = run_benchmark(first, gqa, tmp_path, "oracle", "m1")
    assert run.score.headline == pytest.approx(100 * (len(gqa.items) - 3) / len(gqa.items))
    again = Oracle(gqa.items)
    assert run_benchmark(again, gqa, tmp_path, "oracle", "m1").score.headline == run.score.headline
    assert again.asked == 0, "the same model on the same set is read back"
    other = run_benchmark(again, gqa, tmp_path, "oracle", "m2")
    assert again.asked == len(gqa.items) and other.score.headline == 100.0
    assert other.identity != run.identity and other.eval_identity == run.eval_identity


def test_the_set_identity_follows_image_bytes(eval_replicas: Path, tmp_path: Path) -> None:
    import shutil

    from tasks.quality.harness import eval_set_identity

    copy = tmp_path / "root"
    shutil.copytree(eval_replicas, copy)
    before = eval_set_identity(_set("tiny-gqa", copy))
    image = sorted((copy / "samples/eval/gqa/images").iterdir())[0]
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(image, format="JPEG")
    assert eval_set_identity(_set("tiny-gqa", copy)) != before


def test_official_files_gqa_json_mme_txt_and_mmbench_xlsx(eval_replicas: Path, tmp_path: Path) -> None:
    gqa = _set("tiny-gqa", eval_replicas, limit=4)
    run = run_benchmark(Oracle(gqa.items), gqa, tmp_path / "gqa", "oracle", "m1")
    predictions = json.loads(Path(run.official_files[0]).read_text())
    assert [p["questionId"] for p in predictions] == [str(i.question_id) for i in gqa.items]
    assert [p["prediction"] for p in predictions] == [i.truth for i in gqa.items]
    mme = _set("tiny-mme", eval_replicas, limit=3)
    run = run_benchmark(Oracle(mme.items), mme, tmp_path / "mme", "oracle", "m1")
    lines = [line.split("\t") for f in run.official_files for line in Path(f).read_text().splitlines()]
    assert len(lines) == len(mme.items) and all(len(parts) == 4 for parts in lines)
    assert all(parts[1].endswith("Please answer yes or no.") and parts[2] == parts[3] for parts in lines)
    mmbench = _set("tiny-mmbench", eval_replicas, limit=2)
    run = run_benchmark(Oracle(mmbench.items), mmbench, tmp_path / "mmb", "oracle", "m1")
    from openpyxl import load_workbook

    sheet = load_workbook(run.official_files[0]).active
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[0][:2] == ("index", "question") and len(rows) == len(mmbench.items) + 1
    assert all(row[6] == row[7] for row in rows[1:]), "prediction column = answer for a perfect model"


def test_answers_out_of_step_or_repeated_are_clear_errors(eval_replicas: Path, tmp_path: Path) -> None:
    gqa = _set("tiny-gqa", eval_replicas, limit=3)
    path = tmp_path / "a.jsonl"
    rows = [{"question_id": i.question_id, "text": i.truth} for i in gqa.items]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    with pytest.raises(AnswersError, match="no answer"):
        score_file(gqa, path)
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[0]]))
    with pytest.raises(AnswersError, match=r"a\.jsonl:4: a second answer"):
        read_answers(path, "gqa")
    path.write_text("not json\n")
    with pytest.raises(AnswersError, match=r"a\.jsonl:1: not a JSON object"):
        read_answers(path, "gqa")


def test_mvlm_eval_score_scores_other_answers(eval_replicas: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MVLM_DATA_ROOT", str(eval_replicas))
    pope = _set("tiny-pope", eval_replicas)
    path = tmp_path / "answers.jsonl"
    rows = [{"question_id": i.question_id, "prompt": i.prompt, "text": "no" if n % 4 == 0 else _truth_text(i)}
            for n, i in enumerate(pope.items)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["eval", "score", "tiny-pope", str(path)])
    assert result.exit_code == 0, result.output
    wrong = sum(n % 4 == 0 and i.truth == "yes" for n, i in enumerate(pope.items))
    scored = score_file(pope, path)
    assert sum(scored.correct.values()) == len(pope.items) - wrong and 50 < scored.headline < 100
    assert re.search(rf"│ headline\s+│ {scored.headline:.2f}\s+│", result.output), result.output
    path.write_text(path.read_text().splitlines()[0] + "\n")
    result = CliRunner().invoke(app, ["eval", "score", "tiny-pope", str(path)])
    assert result.exit_code == 2 and "no answer" in result.output and "Traceback" not in result.output


def test_pytorch_batches_give_the_answers_of_one_question_at_a_time(
    eval_replicas: Path, trained_vlm: Path
) -> None:
    from tasks.quality.backends import TorchAnswerer
    from tasks.quality.harness import ask

    items = _set("tiny-sqa", eval_replicas, limit=12).items
    batched = ask(TorchAnswerer(trained_vlm, batch=8), items, 6)
    single = ask(TorchAnswerer(trained_vlm, batch=1), items, 6)
    assert batched == single and len(batched) == 12 and any(batched.values())


@pytest.mark.slow
def test_llama_cpp_answers_text_questions_as_pytorch_does(eval_replicas: Path, trained_vlm: Path,
                                                          f32_export, tmp_path: Path) -> None:  # fmt: skip
    from tasks.quality.backends import LlamaCppAnswerer, TorchAnswerer, resolve_model
    from tasks.quality.harness import evaluate_model

    sqa = _set("tiny-sqa", eval_replicas)
    text_only = [i for i in sqa.items if i.image is None][:6]
    with_image = [i for i in sqa.items if i.image is not None][:4]
    torch_answers = TorchAnswerer(trained_vlm, batch=1).answer([i.prompt for i in text_only], [None] * 6, 6)
    runtime = LlamaCppAnswerer(f32_export.llm, f32_export.mmproj, trained_vlm)
    try:
        assert runtime.answer([i.prompt for i in text_only], [None] * 6, 6) == torch_answers
        from tasks.quality.harness import _image

        got = runtime.answer([i.prompt for i in with_image], [_image(i) for i in with_image], 6)
        assert len(got) == 4 and all(isinstance(a, str) for a in got)
    finally:
        runtime.close()
    ref = resolve_model(f32_export.llm)
    assert (
        ref.backend == "llama.cpp/f32" and ref.mmproj == f32_export.mmproj and ref.checkpoint == trained_vlm
    )
    spec = find_eval_spec("tiny-sqa")[1].model_copy(update={"limit": 6})
    (run,) = evaluate_model(ref, [spec], eval_replicas, tmp_path)
    assert run.backend == "llama.cpp/f32" and run.questions == 6 and Path(run.folder, ANSWERS_FILE).is_file()


def test_agreement_counts_identical_answers_and_verdicts(eval_replicas: Path, tmp_path: Path) -> None:
    from tasks.quality.harness import agreement

    gqa = _set("tiny-gqa", eval_replicas, limit=10)
    n = len(gqa.items)
    run_benchmark(Oracle(gqa.items), gqa, tmp_path / "a", "oracle", "m1")
    run_benchmark(Oracle(gqa.items, wrong=3), gqa, tmp_path / "b", "oracle", "m2")
    assert agreement(tmp_path / "a", tmp_path / "b") == {
        "same_answer": (n - 3) / n,
        "same_verdict": (n - 3) / n,
    }
    assert agreement(tmp_path / "b", tmp_path / "b") == {"same_answer": 1.0, "same_verdict": 1.0}
