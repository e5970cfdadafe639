"""Every command: the module that defines it and its one-line summary for `ladle --help`.

The summaries live here so that `ladle --help` lists the commands without importing
them (a test checks that each matches the first line of its command's docstring).
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "avg": ("ladle.cli.avg", "Average checkpoints into one model, one tensor at a time."),
    "demo": ("ladle.cli.demo", "Train a small network on bundled data and compare final models."),
    "diff": ("ladle.cli.diff", "Compare two checkpoints tensor by tensor."),
    "export": ("ladle.cli.export", "Export a checkpoint for inference."),
    "inspect": ("ladle.cli.inspect", "Show what a checkpoint holds, without running code from it."),
    "ls": ("ladle.cli.ls", "List a run's checkpoints: name, step, metrics, marks."),
    "report": ("ladle.cli.report", "Draw a run's learning curves, one panel per metric."),
    "soup": ("ladle.cli.soup", "Average a run's checkpoints chosen by a recipe (a soup)."),
    "verify": ("ladle.cli.verify", "Check every checkpoint file against its recorded checksum."),
    "version": ("ladle.cli.version", "Print ladle's version."),
}
