"""boneage: skeletal (bone) age from a child's hand radiograph."""

__version__ = "0.1.0"
