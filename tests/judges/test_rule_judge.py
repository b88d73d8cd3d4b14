"""RuleJudge: per-step alignment/contribution from facts, on gold rationales and free model text."""
import numpy as np
import pytest

from mrpo.data.synthetic import _rationale, _sample_text, make_example
from mrpo.judges.base import JudgeRequest, StepJudge
from mrpo.judges.rule import RuleJudge, extract_facts

FACTS = dict(modality="ct", organ="liver", lesion_count=2, side="left", size="small",
             question_type="count", answer_type="open", asked=None, answer="2")


def _verdict(steps, facts=FACTS):
    return RuleJudge().judge_steps(steps, facts)


@pytest.mark.parametrize("step, aligned, contributes", [
    ("The image is a CT scan.", 1, 0),
    ("This is a computed tomography image of the LIVER.", 1, 0),
    ("The image is an MRI scan.", 0, 0),
    ("We see two small lesions in the left lobe of the liver.", 1, 1),
    ("There are 2 lesions.", 1, 1),
    ("There are three lesions on the left side.", 0, 0),
    ("There is one lesion on the left side.", 0, 0),
    ("There are no lesions in the liver.", 0, 0),
    ("The lesions are small.", 1, 0),
    ("The lesions are large.", 0, 0),
    ("The lesions are not large.", 1, 0),
    ("The lesions are on the right side.", 0, 0),
    ("Both lesions sit on the left.", 1, 0),
    ("Therefore the answer is 2.", 1, 1),
    ("So the answer is two.", 1, 1),
    ("Therefore the answer is 3.", 0, 0),
    ("Is this a CT scan of the liver?", 0, 0),              # a question states nothing
    ("Let me look at the image carefully.", 0, 0),          # no fact
    ("The image is a CT scan showing three lesions.", 0, 0),  # one right fact, one wrong: misaligned
])
def test_single_steps(step, aligned, contributes):
    v = _verdict([step])
    assert (v.alignment, v.contribution) == ([aligned], [contributes]), extract_facts(step)


def test_contribution_follows_question_type():
    lat = dict(FACTS, question_type="laterality", answer="left")
    assert _verdict(["There are two lesions on the left side.", "The lesions are small."], lat).contribution == [1, 0]
    closed = dict(FACTS, question_type="modality", answer_type="closed", asked="mri", answer="no")
    v = _verdict(["The image is a CT scan.", "The scan shows the liver.", "Therefore the answer is no.",
                  "The answer is yes."], closed)
    assert v.alignment == [1, 1, 1, 0] and v.contribution == [1, 0, 1, 0]
    none = dict(FACTS, lesion_count=0, side=None, size=None, question_type="presence", answer_type="closed",
                asked=True, answer="no")
    v = _verdict(["No lesion is seen in the liver.", "The lesion is on the left side.",
                  "The liver does not show any masses.", "The answer is: No"], none)
    assert v.alignment == [1, 0, 1, 1] and v.contribution == [1, 0, 1, 1]


def test_free_text_variants():
    f = dict(FACTS, modality="x-ray", organ="lung", lesion_count=3, side="both", size="large",
             question_type="organ", answer="lung")
    steps = ["An X-ray of the chest.", "The LUNGS are visible.", "3 big nodules, bilaterally.",
             "Answer: lungs", "The answer is the kidney.", "It is a radiograph."]
    v = _verdict(steps, f)
    assert v.alignment == [1, 1, 1, 1, 0, 1]
    assert v.contribution == [1, 1, 0, 1, 0, 0]
    assert v.valid == [True, True, True, True, False, True]


def test_gold_rationales_all_valid_and_wrong_facts_caught():
    """Every gold step is aligned and the conclusion contributes; corrupting one fact in the
    rationale makes exactly the steps that state it misaligned."""
    judge = RuleJudge()
    rng = np.random.default_rng(0)
    for _ in range(300):
        facts, _, steps = _sample_text(rng)
        v = judge.judge_steps(steps, facts)
        assert all(v.alignment), (steps, v)
        assert v.contribution[-1] == 1 and sum(v.contribution) >= 1
        other = "mri" if facts["modality"] != "mri" else "ct"
        wrong = _rationale(dict(facts, modality=other), np.random.default_rng(1))
        vw = judge.judge_steps(wrong, facts)
        assert vw.alignment[0] == 0 and all(vw.alignment[1:])


def test_judge_interface_and_stats():
    rec, _ = make_example(0, "test", 0, image_size=16)
    judge: StepJudge = RuleJudge(cfg=None)
    reqs = [JudgeRequest("a", rec["problem"], None, rec["solution"], rec["gold_reasoning"],
                         ["The image is an X-ray.", "Therefore the answer is " + rec["solution"] + "."],
                         facts=rec["facts"]),
            JudgeRequest("b", "q", None, "yes", "", ["One step."], facts=None),
            JudgeRequest("c", "q", None, "yes", "", [], facts=rec["facts"])]
    out = judge.judge(reqs)
    assert out[0] is not None and len(out[0].alignment) == 2 and out[0].contribution[1] == 1
    assert out[0].alignment[0] == int(rec["facts"]["modality"] == "x-ray")
    assert out[1] is None
    assert out[2].alignment == [] and out[2].contribution == []
    assert judge.stats.requests == 3 and judge.stats.failures == 1
