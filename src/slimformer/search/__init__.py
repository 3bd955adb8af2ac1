"""The search: an Optuna study over the passes' settings, every trial measured.

    settings.py      what a study is asked to do (StudySettings, budgets, --passes entries)
    space.py         recipes <-> Optuna parameters (the conditional search space)
    records.py       typed results: EvaluationResult, TrialRecord, BestModel, StudyResult
    selection.py     the Pareto front and the choice
    candidates.py    building and evaluating candidates, each in a child process (the real
                     models behind the loop)
    budget.py        the time budget as a deadline: estimates, the passes' own deadline
    run_folder.py    the run folder: run.json, trials.jsonl, pareto.json, best/, resume checks
    lock.py          one study per run folder
    killpoints.py    named moments the crash tests kill the study at
    optuna_study.py  the Optuna storage, requeues on resume, trials <-> records
    runner.py        the loop: ask, build, evaluate, tell; run_study is the entry point

Nothing here renders for people (report.py does; the model card and report.html come in as
callbacks).
Import from the modules themselves. This __init__ stays empty on purpose: evaluate.py reads
`records` and the loop imports evaluate.py, so re-exporting the loop here would be a cycle.
"""
