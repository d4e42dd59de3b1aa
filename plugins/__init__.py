"""fewstep built-in plugins, each registered through the fewstep entry-point group."""
