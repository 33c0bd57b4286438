"""What every room of the study stands on: the profile (`config`), where each artifact lives (`artifacts`), the
records stages hand each other (`records`), provenance, the session (a profile, its layout and its checked data)
and the executors. Imports nothing else of the study."""
