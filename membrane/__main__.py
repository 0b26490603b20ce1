from membrane.cli import main

raise SystemExit(main())
