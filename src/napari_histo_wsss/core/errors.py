"""Exception types shared by the core. Every message names the offending file or value."""


class HistoWSSSError(Exception):
    """Base class: an error with a message meant for the user (CLI prints it, GUI notifies it)."""


class SlideError(HistoWSSSError):
    """A slide or image cannot be opened or read."""


class ProjectError(HistoWSSSError):
    """A project folder is missing, damaged, of an unknown schema, or not writable."""


class DatasetError(HistoWSSSError):
    """A dataset folder, label file name or mask does not follow a supported layout."""


class ClassTableError(HistoWSSSError):
    """Class indices or label vectors disagree with the class table."""


class TrainingError(HistoWSSSError):
    """Training cannot start or continue (bad config, NaN loss, incompatible checkpoint...)."""


class Cancelled(HistoWSSSError):
    """Long work was cancelled by the user; partial results were saved where documented."""
