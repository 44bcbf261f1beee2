"""The rules every tier shares: the one root of user errors, the command-line runner, the folders the
project makes (markers, atomic writes, run locks) and file hashing. Imports nothing of the project."""
