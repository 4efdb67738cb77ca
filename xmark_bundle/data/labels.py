"""The CheXpert competition labels this bundle predicts, in output-channel order."""

LABELS: tuple[str, ...] = (
    "No Finding",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)
