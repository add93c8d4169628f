"""Label Studio's own state, kept true through its API: the project's current model version (so the score columns,
sorting and "use predictions" refer to the model we serve) and the ML backend's title as the notice of a pre-label
run an annotator queued from the data manager."""
