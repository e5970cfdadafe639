"""The run directory: storage seam, writer lock, atomic commits, index, history log, verification,
checkpoint references, and read-only views of other tools' output folders."""
