from rmbgd.cli import main

raise SystemExit(main())
