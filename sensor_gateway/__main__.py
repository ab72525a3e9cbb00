from sensor_gateway.cli import main

raise SystemExit(main())
