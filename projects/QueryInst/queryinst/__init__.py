"""QueryInst (Fang et al., "Instances as Queries", ICCV 2021) on Detectron2."""
