"""The command layer: printing, standard input, files, REPLs. It calls the library, never the reverse."""
