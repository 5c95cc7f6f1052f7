"""resnet_snake: Snake Learning on torchvision's ResNet-18 with automatic segments."""
