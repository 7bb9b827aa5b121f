"""File formats the job layer reads and writes: RELION STAR, cryoSPARC .cs, MRC stacks, cryoDRGN pickles, ChimeraX scripts, atomic writes."""
