"""tools/leaderboard.py's rules at their edges, each checked against a definition written out here over many
generated cases: the stop rule for every check schedule, argv read as the harness's own parser reads it (a repeated
flag included), which earlier record a new one beat, the order of records in time, and a record's date."""

import dataclasses
import datetime
import json
import random
from pathlib import Path

import leaderboard as lb
import pytest
from test_leaderboard import finish, make_log

import airbench_ssl as ab

TARGET = 90.0


########################################
#  The stop rule, for every check schedule

def scheduled_checks(first: int, every: int, epochs: int) -> list[int]:
    """The check schedule as the rules state it: epoch `first`, every `every` epochs after it, and the last epoch."""
    return sorted({*range(first, epochs + 1, every), epochs})


def stopped_log(first: int, every: int, epochs: int, accs: list[float]) -> dict:
    """A valid record's log with its schedule replaced; the run stopped after len(accs) checks, which gave accs."""
    log = make_log(0)
    log["config"].update(epochs=epochs, check_first_epoch=first, check_every_epochs=every)
    checks = scheduled_checks(first, every, epochs)
    knn = dict(zip(checks, accs))
    rows = [{"epoch": epoch, "loss": None if epoch == 0 else 5.0 - 0.1 * epoch, "lr": None if epoch == 0 else 0.06,
             "epoch_seconds": 0.0 if epoch == 0 else 10.0 + 0.01 * epoch, "timed_seconds": 0.0,
             "knn_pct": knn.get(epoch), "knn_seconds": 1.5 if epoch in knn else None}
            for epoch in range(0 if first == 0 else 1, checks[len(accs) - 1] + 1)]
    log["epochs"] = rows
    return finish(log)


SCHEDULES = [(first, every, epochs) for first in (0, 1, 3) for every in (1, 2, 3) for epochs in (6, 7)]


def test_a_run_is_a_record_only_if_it_stopped_at_the_first_check_that_reached_the_target():
    """For every schedule (checks every epoch included), every check the target is first reached at (exactly at the
    target, the edge), and a run that went on for 0, 1 or 2 more checks (whatever those gave): only the run that
    stopped there passes."""
    rng, cases = random.Random(0), 0
    for first, every, epochs in SCHEDULES:
        n_checks = len(scheduled_checks(first, every, epochs))
        for reached in range(n_checks):
            for overrun in range(3):
                if reached + overrun >= n_checks:
                    continue
                accs = [rng.choice([10.0, 89.99]) for _ in range(reached)] + [TARGET] + [
                    rng.choice([89.99, TARGET, 95.0]) for _ in range(overrun)]
                log = stopped_log(first, every, epochs, accs)
                lb.rule_check_schedule(log)  # the generated logs keep the schedule: only the stop rule is tested
                if overrun == 0:
                    lb.rule_stop_rule(log)
                else:
                    with pytest.raises(lb.Broken):
                        lb.rule_stop_rule(log)
                cases += 1
    assert cases > 100


@pytest.mark.parametrize("first, every, accs, accepted", [
    (1, 1, [80.0, TARGET], True),
    (1, 1, [80.0, TARGET, 95.0], False),  # one check past the target, checks every epoch
    (0, 1, [TARGET], True),  # reached before training: a 0 s run is still refused, by another rule
    (2, 2, [89.99, 89.999999], False),  # never reached
])
def test_stop_rule_through_the_whole_validator(first, every, accs, accepted):
    try:
        lb.validate_log(stopped_log(first, every, 6, accs))
        reasons = []
    except lb.Refused as refusal:
        reasons = refusal.lines() if hasattr(refusal, "lines") else [refusal.line()]
    assert any("stop rule: " in reason for reason in reasons) != accepted, reasons


def test_a_runs_summary_is_the_numbers_of_its_rows():
    """What a record is ranked by comes from the rows, whatever the result block says: the time is the sum of every
    epoch's time, the accuracy the last check's, the epochs the last row's."""
    rng = random.Random(5)
    for first, every, epochs in SCHEDULES:
        checks = scheduled_checks(first, every, epochs)
        reached = rng.choice([i for i, epoch in enumerate(checks) if epoch >= 1])  # a record trained something
        log = stopped_log(first, every, epochs, [rng.uniform(0, 89.9) for _ in range(reached)] + [
            rng.uniform(TARGET, 99.0)])
        for row in log["epochs"]:
            row["epoch_seconds"] = 0.0 if row["epoch"] == 0 else rng.uniform(0.5, 20.0)
        finish(log)
        run = lb.validate_log(log)
        rows = log["epochs"]
        assert run.time_to_target_seconds == pytest.approx(sum(r["epoch_seconds"] for r in rows), rel=1e-12)
        assert run.knn_at_stop_pct == rows[-1]["knn_pct"] and run.epochs_run == rows[-1]["epoch"]


def test_times_that_disagree_with_the_epoch_rows_by_more_than_a_millisecond_are_refused():
    """timed_seconds, per row and in the result, must be the running sum of epoch_seconds: float sums and JSON
    round-trips may differ in the last digits (1e-6 relative), anything above 1 ms is an edited time."""
    rng = random.Random(6)
    for _ in range(100):
        log = stopped_log(1, 1, 6, [80.0, 85.0, TARGET])
        row = rng.choice(log["epochs"])
        tolerance = 1e-3 + 1e-6 * row["timed_seconds"]
        shift = rng.choice([-1, 1]) * rng.choice([0.1, 0.9, 1.1, 2.0, 100.0, 1e4]) * tolerance
        row["timed_seconds"] += shift
        if abs(shift) < tolerance:
            lb.rule_timed_seconds(log)
        else:
            with pytest.raises(lb.Broken, match="timed_seconds"):
                lb.rule_timed_seconds(log)


########################################
#  argv is read as the harness reads it########################################
#  argv is read as the harness reads it

def cli_values(field: dataclasses.Field) -> list[str]:
    """A few valid command-line texts for a field."""
    if field.type is bool:
        return ["true", "no", "1", "OFF"]
    if field.metadata.get("choices"):
        return list(field.metadata["choices"])
    lo, hi = field.metadata.get("bounds", (None, None))
    if lo is None:
        return ["", "x", "some/path"]
    values = [lo, hi, field.default]
    return [str(v) if field.type is int else repr(float(v)) for v in values]


FIELDS = [f for f in dataclasses.fields(ab.Config) if f.name not in ("device", "seed")]
PARSER = ab.build_parser()


def random_argv(rng: random.Random, config_files: list[str]) -> list[str]:
    """Flags of a few fields, each possibly repeated, as --field value or --field=value; maybe --preset and --config,
    possibly repeated too."""
    fields = rng.sample(FIELDS, 3)
    items = [(f"--{f.name.replace('_', '-')}", rng.choice(cli_values(f))) for f in rng.choices(fields, k=rng.randint(
        1, 6))]
    items += [("--preset", rng.choice(["recipe", "auto", "cpu_demo"])) for _ in range(rng.choice([0, 0, 1, 2]))]
    items += [("--config", rng.choice(config_files)) for _ in range(rng.choice([0, 0, 1, 2]))]
    rng.shuffle(items)
    argv = ["--seed", "0"]
    for name, value in items:
        argv += [f"{name}={value}"] if rng.random() < 0.3 else [name, value]
    return argv


def log_of(argv: list[str]) -> dict | None:
    """A valid record's log whose argv, config and config_sources are what the harness makes of argv on a GPU
    machine, or None where the harness refuses argv."""
    try:
        cfg, sources = ab.config_from_args(PARSER.parse_args(argv), True)
    except ab.HarnessError:
        return None
    log = make_log(0)
    log.update(argv=argv, config=dataclasses.asdict(cfg), config_sources=sources)
    log["launch"]["command"] = ["airbench_ssl.py", *argv]
    return log


def test_argv_rule_accepts_what_the_harness_makes_of_argv_and_nothing_else(tmp_path):
    """Over random command lines with repeated flags, both flag forms, a repeated --preset and --config: the rule
    accepts the config the harness's parser resolves, and refuses it with one field changed to another value the
    same argv also named (the first of a repeated flag, which argparse overrides) or to any other valid value."""
    config_files = []
    for i, overrides in enumerate([{"epochs": 30, "width": 32}, {"epochs": 40, "temperature": 0.2}]):
        (tmp_path / f"c{i}.json").write_text(json.dumps(overrides))
        config_files.append(str(tmp_path / f"c{i}.json"))
    rng, accepted, lies, repeated = random.Random(1), 0, 0, 0
    by_name = {f.name: f for f in FIELDS}
    for _ in range(300):
        argv = random_argv(rng, config_files)
        log = log_of(argv)
        if log is None:
            continue
        lb.rule_argv(log)
        accepted += 1
        flags, _, _ = lb.parse_argv(argv)
        for field in sorted(set(flags) - {"seed"}):
            given = [argv[i + 1] if "=" not in a else a.partition("=")[2] for i, a in enumerate(argv)
                     if a.partition("=")[0] == f"--{field.replace('_', '-')}"]
            repeated += len(set(given)) > 1
            for text in {*given, *cli_values(by_name[field])}:
                value = lb_value(by_name[field], text)
                if value == log["config"][field] and type(value) is type(log["config"][field]):
                    continue
                lie = json.loads(json.dumps(log))
                lie["config"][field] = value
                with pytest.raises(lb.Broken):
                    lb.rule_argv(lie)
                lies += 1
        for key, other in (("preset", ["recipe", "cpu_demo"]), ("config_file", config_files)):
            for value in other:  # the config came from another preset or file than argv's last
                expected = log["config_sources"][key]
                if value != expected and not (key == "preset" and expected == "recipe" and value == "auto"):
                    lie = json.loads(json.dumps(log))
                    lie["config_sources"][key] = value
                    with pytest.raises(lb.Broken):
                        lb.rule_argv(lie)
    assert accepted > 150 and lies > 300 and repeated > 30


def lb_value(field: dataclasses.Field, text: str):
    """What the harness's parser makes of `text` for `field`."""
    return getattr(PARSER.parse_args([f"--{field.name.replace('_', '-')}", text]), field.name)


########################################
#  The runs of one record, and their data

PER_RUN_FIELDS = {"seed", "data_dir", "log_dir", "download", "save_model"}  # where a record's runs may differ


def test_the_runs_of_a_record_share_every_config_field_but_the_per_run_ones():
    """A record is one recipe run several times: two runs that differ in any field of the config other than the
    seed and where files are read from or written to are not one record."""
    runs = [distinct_run(f"run{i}", seed=i) for i in range(3)]
    lb.validate_runs(runs)
    for field in dataclasses.fields(ab.Config):
        other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2,
                 str: lambda v: v + "x"}[field.type](field.default)
        changed = runs[:2] + [dataclasses.replace(runs[2], config={**runs[2].config, field.name: other})]
        try:
            lb.validate_runs(changed)
            refused = ""
        except lb.Refused as refusal:
            refused = str(refusal)
        if field.name in PER_RUN_FIELDS:
            assert "one config" not in refused, field.name
        else:
            assert "one config" in refused and field.name in refused, field.name


def test_data_is_official_only_if_every_files_measured_md5_is_the_official_one():
    """A log's data block holds, per file, the md5 the harness measured, the one it expected and whether they
    matched: a record needs all three right for all six files; any one wrong, for any one file, is refused."""
    log = make_log(0)
    lb.rule_official_data(log)
    for name in log["data"]["files"]:
        for key, wrong in (("md5", "0" * 32), ("expected_md5", "0" * 32), ("ok", False), ("ok", 1)):
            edited = json.loads(json.dumps(log))
            edited["data"]["files"][name][key] = wrong
            with pytest.raises(lb.Broken, match="md5"):
                lb.rule_official_data(edited)


########################################
#  Records between themselves

BASE_RUN = lb.validate_log(make_log(0))


def distinct_run(run_id: str, **changes) -> lb.Run:
    """BASE_RUN as another run: its own id, identity, losses and epoch times (where the Run has them)."""
    rng = random.Random(run_id)
    unique = dict(run_id=run_id, file=f"{run_id}.json", identity=frozenset({f"run_id {run_id}"}),
                  losses=tuple(rng.uniform(1, 5) for _ in BASE_RUN.losses),
                  epoch_seconds=tuple(rng.uniform(5, 15) for _ in BASE_RUN.epoch_seconds))
    fields = {f.name for f in dataclasses.fields(lb.Run)}
    return dataclasses.replace(BASE_RUN, **{k: v for k, v in {**unique, **changes}.items() if k in fields})


def record(name: str, date: str, mean: float, gpu: str = "NVIDIA H200", gpus: int = 1) -> lb.Record:
    """A record of three runs whose mean time to target is `mean`."""
    runs = tuple(distinct_run(f"{name}_{i}", time_to_target_seconds=mean + spread, gpu_model=gpu, world_size=gpus)
                 for i, spread in enumerate((-0.25, 0.0, 0.25)))
    return lb.Record(folder=Path("records") / f"{date}_{name}", name=name, date=date, description="d", runs=runs)


def day(n: int) -> str:
    return (datetime.date(2025, 1, 1) + datetime.timedelta(days=n)).isoformat()


HARDWARE = [("NVIDIA H200", 1), ("NVIDIA H200", 2), ("NVIDIA A100-SXM4-80GB", 1)]


def history(rng: random.Random) -> list[lb.Record]:
    """Records as `add` admits them: on each hardware each one dated no earlier and faster than all before it."""
    records = []
    for h, (gpu, gpus) in enumerate(HARDWARE):
        date, mean = rng.randint(0, 5), rng.uniform(500, 1000)
        for i in range(rng.randint(0, 5)):
            records.append(record(f"R{h}x{i}", day(date), mean, gpu, gpus))
            date, mean = date + rng.randint(1, 3), mean - rng.uniform(1, 100)
    rng.shuffle(records)
    return records


def test_the_record_a_new_one_beat_is_the_next_slower_on_its_hardware():
    rng = random.Random(2)
    for _ in range(200):
        records = history(rng)
        for r in records:
            slower = [o for o in records if o.hardware == r.hardware and o.mean_time > r.mean_time]
            expected = min(slower, key=lambda o: o.mean_time) if slower else None
            assert lb.previous_record(r, records) == expected
            others = [o for o in records if o is not r]  # as `add` asks, before the new record is in
            assert lb.previous_record(r, others) == expected
        assert not lb.record_problems(records)


def test_records_out_of_order_in_time_or_tied_are_problems_and_nothing_else_is():
    """Random records, dates and times from small sets (ties are common): record_problems reports something exactly
    when, on one hardware, a record is not faster than one dated before it, or two of one date tie."""
    rng, flagged = random.Random(3), 0
    for trial in range(400):
        records = [record(f"R{trial}x{i}", day(rng.randint(0, 3)), rng.choice([100.0, 200.0, 300.0]),
                          *rng.choice(HARDWARE)) for i in range(rng.randint(1, 5))]
        broken = any(a.hardware == b.hardware and (a.date < b.date and not b.mean_time < a.mean_time or (
            a is not b and a.date == b.date and a.mean_time == b.mean_time)) for a in records for b in records)
        assert bool(lb.record_problems(records)) == broken, [(r.hardware, r.date, r.mean_time) for r in records]
        flagged += broken
    assert 50 < flagged < 350


def test_a_run_in_two_records_is_a_problem():
    a, b = record("A", day(0), 200.0), record("B", day(1), 100.0)
    assert not lb.record_problems([a, b])
    b = dataclasses.replace(b, runs=(*b.runs[:2], dataclasses.replace(a.runs[1], file="copy.json")))
    assert any("one run, one record" in p for p in lb.record_problems([a, b]))


########################################
#  A record's date

def test_a_record_may_be_dated_the_day_of_its_latest_run_and_not_before():
    rng = random.Random(4)
    for _ in range(300):
        created = [f"{day(rng.randint(0, 4))}T{rng.choice(['00:00:00', '12:30:00', '23:59:59'])}Z" for _ in range(3)]
        runs = [distinct_run(f"run{i}", created_utc=c) for i, c in enumerate(created)]
        latest_day = max(c[:10] for c in created)
        for date in (day(n) for n in range(-1, 7)):
            assert (lb.date_problem(date, runs) is None) == (date >= latest_day), (date, created)


def test_a_record_may_be_dated_tomorrow_but_not_later():
    """Submitters in time zones ahead of UTC may already live in tomorrow; the day after that is the future."""
    today = datetime.date(2025, 3, 1)
    for offset, ok in ((-400, True), (0, True), (1, True), (2, False), (30, False)):
        date = (today + datetime.timedelta(days=offset)).isoformat()
        try:
            lb.check_submission("Name", "a description", date, today)
            refused = None
        except lb.Refused as refusal:
            refused = str(refusal)
        assert (refused is None) == ok, (offset, refused)
        assert ok or "in the future" in refused
