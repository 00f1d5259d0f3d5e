"""Where this process sits in the job, and the process group built from it."""
