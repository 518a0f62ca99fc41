"""Errors shared by the data modules.

Usage:
  raise DataError(f'{path} not found')
"""


class DataError(ValueError):
  """A dataset file is missing, corrupt or not what was expected."""
