from mtrain.cli import main

raise SystemExit(main())
